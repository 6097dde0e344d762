"""The bundled names and the makemore data pipeline: vocabulary, split, context windows, bad word lists."""

import pytest

from fastlm import data


def test_bundled_names_match_makemore():
    words, vocab = data.load_words()
    assert len(words) == 32033 and vocab.size == 27 and words[0] == "emma"
    train, val, test = data.split_words(words, seed=42)
    assert (len(train), len(val), len(test)) == (25626, 3203, 3204)
    X, Y = data.build_windows(train, 3, vocab)
    assert X.shape == (182625, 3) and Y.shape == (182625,)  # the lecture's Xtr for seed 42


def test_windows_of_one_word():
    X, Y = data.build_windows(["emma"], 3, data.Vocabulary())
    assert X.tolist() == [[0, 0, 0], [0, 0, 5], [0, 5, 13], [5, 13, 13], [13, 13, 1]]
    assert Y.tolist() == [5, 13, 13, 1, 0]


def test_split_is_seeded_and_covers_every_word():
    words = [f"w{'a' * i}" for i in range(50)]
    assert data.split_words(words, 1) == data.split_words(words, 1)
    assert data.split_words(words, 1) != data.split_words(words, 2)
    assert sorted(sum(data.split_words(words, 1), [])) == sorted(words)


def test_own_word_list_and_vocabulary_extension(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("anna\n\nbob\n")
    assert data.load_words(path)[0] == ["anna", "bob"]
    path.write_text("bob\n\nzoé\n")
    with pytest.raises(data.DataError, match=r"line 3 \('zoé'\) has characters outside the vocabulary: 'é'"):
        data.load_words(path)
    words, vocab = data.load_words(path, vocab=None)
    assert vocab.chars.endswith("é") and vocab.decode(vocab.encode("zoé")) == "zoé"
    path.write_text("anna\nbo\u2028b\nzoé\n")  # lines as an editor counts them: a Unicode separator is no line end
    with pytest.raises(data.DataError, match=r"line 2 \('bo\\u2028b'\)"):  # the word's repr
        data.load_words(path)


def test_windows_text_reads_as_plain_text(tmp_path):
    """A byte-order mark and CRLF line ends, as Windows editors write them, are not part of any word."""
    path = tmp_path / "words.txt"
    path.write_bytes("anna\r\nbob\r\n".encode("utf-8-sig"))
    words, vocab = data.load_words(path)
    assert words == ["anna", "bob"] and vocab == data.Vocabulary()
    assert data.load_words(path, vocab=None)[1] == data.Vocabulary()  # no BOM or CR character added


def test_errors_name_characters_by_code_point_and_cut_long_words(tmp_path):
    """A combining accent showed as a bare, invisible character; a word list of one 7-million-character line gave
    a 7 MB message."""
    path = tmp_path / "words.txt"
    path.write_text("anna\nzoe\u0301\n")
    with pytest.raises(data.DataError, match=r"outside the vocabulary: '\u0301' \(U\+0301\)$"):
        data.load_words(path)
    path.write_text("anna\n" + "x" * 100_000 + ".\n")
    with pytest.raises(data.DataError) as refused:
        data.load_words(path)
    assert len(str(refused.value)) < 400 and "xxx...'" in str(refused.value)  # the path, 60 characters, the rest


def test_a_word_list_that_cannot_be_read_is_a_data_error(tmp_path, monkeypatch):
    """No permission to read it (or an I/O error): a one-line error, where a PermissionError traceback was."""
    path = tmp_path / "words.txt"
    path.write_text("anna\n")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(type(path), "read_text", refuse)
    with pytest.raises(data.DataError, match="cannot read word list .*: Permission denied$"):
        data.load_words(path)


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("", "has no words"), ("\n \n", "has no words")])
def test_unusable_word_lists_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_words(path)


def test_extra_characters_take_ids_in_sorted_order():
    """Whatever the process's hash seed: the same word list gives the same ids in every process and run."""
    assert data.Vocabulary.from_words(["ñé", "zé"]).chars.endswith("éñ")


def test_the_digest_tells_where_the_words_break():
    assert data.words_digest(["ab", "c"]) != data.words_digest(["a", "bc"])


def test_a_word_of_many_unknown_characters_names_the_first_ten(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("anna\n" + "".join(chr(0x3b1 + i) for i in range(12)) + "\n", encoding="utf-8")
    with pytest.raises(data.OutsideVocabulary) as error:
        data.load_words(path)
    assert str(error.value).endswith("'θ' (U+03B8), 'ι' (U+03B9), 'κ' (U+03BA), ...")
