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


@pytest.mark.parametrize("content,message", [(None, "does not exist"), ("", "has no words"), ("\n \n", "has no words")])
def test_unusable_word_lists_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_text(content)
    with pytest.raises(data.DataError, match=message):
        data.load_words(path)
