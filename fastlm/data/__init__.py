"""The names data set and the makemore data pipeline: words -> (context window, next character) pairs.

The 32,033 names of makemore ship with the package (names.txt, MIT licence in names.LICENSE). A word list
of one's own (UTF-8, one word per line; surrounding whitespace and blank lines dropped, duplicates kept, as
makemore keeps the names') works the same way. Words are split 80/10/10 after a seeded shuffle; every
word becomes one example per character plus the end token '.', each with the ``context`` previous ids
(padded with '.').
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

END = "."
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def bundled_names_path() -> Path:
    return Path(str(resources.files(__name__) / "names.txt"))


@dataclass(frozen=True)
class Vocabulary:
    """Characters and their ids; id 0 is the end/padding token '.'."""

    chars: str = END + LETTERS

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, word: str) -> list[int]:
        return [self.chars.index(ch) for ch in word]

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    @classmethod
    def from_words(cls, words: list[str]) -> "Vocabulary":
        """The default vocabulary, extended by any other characters of ``words``."""
        extra = sorted(set("".join(words)) - set(END + LETTERS))
        return cls(END + LETTERS + "".join(extra))


class DataError(ValueError):
    """A word list that cannot be used, with a message meant for the user."""


class OutsideVocabulary(DataError):
    """A word with characters the vocabulary lacks (the caller knows what the user can do about it)."""


def shown(word: str, limit: int = 60) -> str:
    """A word as an error message shows it: its repr, cut to ``limit`` characters (a word list in the wrong format
    can be one line of megabytes)."""
    return repr(word if len(word) <= limit else word[:limit] + "...")


def named(chars) -> str:
    """Characters as an error names them: each with its code point, which a combining accent or a zero-width
    character needs to be seen at all (the first 10)."""
    chars = list(chars)
    return ", ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in chars[:10]) + (", ..." if len(chars) > 10 else "")


def words_digest(words: list[str]) -> str:
    """A fingerprint of a word list, in order: a run resumed on another list would shuffle and split another one."""
    return hashlib.sha256("\n".join(words).encode()).hexdigest()


def load_words(path: str | Path | None = None, vocab: Vocabulary | None = Vocabulary(),
               ) -> tuple[list[str], Vocabulary]:
    """The words of ``path`` (default: the bundled names), one per line, blank lines skipped, and the
    vocabulary to use. With ``vocab=None`` the vocabulary is extended by the file's own characters;
    otherwise a character outside ``vocab`` is an error naming it and its line."""
    path = Path(path) if path is not None else bundled_names_path()
    if not path.is_file():
        raise DataError(f"word list {str(path)!r} does not exist or is not a file")
    try:  # utf-8-sig: a byte-order mark (as some Windows editors write) is not part of the first word
        lines = path.read_text(encoding="utf-8-sig").split("\n")  # not splitlines: editors' lines, \r stripped
    except UnicodeDecodeError as error:
        raise DataError(f"word list {str(path)!r} is not UTF-8 text: {error}") from None
    except OSError as error:  # no permission to read it, an I/O error
        raise DataError(f"cannot read word list {str(path)!r}: {error.strerror or error}") from None
    numbered = [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise DataError(f"word list {str(path)!r} has no words")
    for number, word in numbered:
        if END in word:
            raise DataError(f"{path}: line {number} ({shown(word)}) contains {END!r}, the end-of-word token, which "
                            "no vocabulary can hold as a character")
    words = [word for _, word in numbered]
    if vocab is None:
        return words, Vocabulary.from_words(words)
    allowed = set(vocab.chars) - {END}
    for number, word in numbered:
        bad = sorted(set(word) - allowed)
        if bad:
            raise OutsideVocabulary(f"{path}: line {number} ({shown(word)}) has characters outside the vocabulary: "
                                    f"{named(bad)}")
    return words, vocab


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """80/10/10 train/val/test after a shuffle seeded with ``seed`` (makemore's split for seed 42)."""
    shuffled = list(words)
    random.Random(seed).shuffle(shuffled)
    n1, n2 = int(0.8 * len(shuffled)), int(0.9 * len(shuffled))
    return shuffled[:n1], shuffled[n1:n2], shuffled[n2:]


def build_windows(words: list[str], context: int, vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """X (n, context) of previous ids and Y (n,) of next ids, over every character of every word and the
    end token."""
    xs, ys = [], []
    for word in words:
        window = [0] * context
        for i in vocab.encode(word + END):
            xs.append(window)
            ys.append(i)
            window = window[1:] + [i]
    return torch.tensor(xs, dtype=torch.long).view(-1, context), torch.tensor(ys, dtype=torch.long)
