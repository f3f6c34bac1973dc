"""`EDA`: easy data augmentation for text (Wei & Zou, 2019), seeded per call so that every variant can be replayed.

Each augmented sentence applies one of four operations, picked uniformly among those switched on,
to the words of the text (split on whitespace; punctuation stays attached to its word):

- synonym replacement (``alpha_sr``): ``n`` distinct non-stop words are each replaced, at every
  occurrence, by a random synonym;
- random insertion (``alpha_ri``): ``n`` times, a random synonym of a random non-stop word is
  inserted at a random position;
- random swap (``alpha_rs``): ``n`` times, two random words swap places;
- random deletion (``p_rd``): each word is deleted with probability ``p_rd`` (one word is kept).

with ``n = max(1, int(alpha * number_of_words))``. Empty text is returned unchanged; a one-word
text can get a synonym or an inserted word, and is never deleted.
"""

from __future__ import annotations

import random
import string
from collections.abc import Collection
from typing import Literal

from lit_bigmodel._checks import check_number
from lit_bigmodel.augmentation.synonyms import SynonymSource, WordNetSynonyms
from lit_bigmodel.errors import ConfigurationError

Operation = Literal["synonym_replacement", "random_insertion", "random_swap", "random_deletion"]
OPERATIONS: tuple[Operation, ...] = ("synonym_replacement", "random_insertion", "random_swap", "random_deletion")

ENGLISH_STOP_WORDS = frozenset((
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "your", "yours", "yourself", "yourselves",
    "he", "him", "his", "himself", "she", "her", "hers", "herself", "it", "its", "itself", "they", "them", "their",
    "theirs", "themselves", "what", "which", "who", "whom", "this", "that", "these", "those", "am", "is", "are",
    "was", "were", "be", "been", "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an",
    "the", "and", "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about",
    "against", "between", "into", "through", "during", "before", "after", "above", "below", "to", "from", "up",
    "down", "in", "out", "on", "off", "over", "under", "again", "further", "then", "once", "here", "there", "when",
    "where", "why", "how", "all", "any", "both", "each", "few", "more", "most", "other", "some", "such", "no",
    "nor", "not", "only", "own", "same", "so", "than", "too", "very", "s", "t", "can", "will", "just", "don",
    "should", "now",
))  # fmt: skip
"""The stop words of the reference EDA implementation (NLTK's English list): never replaced, never a source of insertions."""

_PUNCTUATION = string.punctuation + "“”‘’—–…«»"


class EDA:
    """Easy data augmentation: synonym replacement, random insertion, random swap, random deletion.

    A datamodule given ``augment=EDA(...)`` serves, every training epoch, each example once as it is
    and ``num_aug`` times augmented, the augmented texts drawn anew each epoch from
    ``(seed, epoch, example, copy)``. Called directly, ``eda(text, seed)`` returns one augmented
    text, the same for the same ``seed``.

    Args:
        alpha_sr, alpha_ri, alpha_rs: the fraction of a text's words that synonym replacement,
            random insertion and random swap change (at least one word); 0 switches the operation off.
        p_rd: the probability that random deletion deletes each word; 0 switches it off.
        num_aug: augmented copies of each training example per epoch (the paper's ``n_aug``;
            it suggests 16 for about 500 examples, 8 for a few thousand, 4 beyond).
        synonyms: a callable from a word (lower case) to its synonyms; ``None`` uses
            `WordNetSynonyms` (English, offline, located now and read at the first lookup). Not
            needed when ``alpha_sr`` and ``alpha_ri`` are 0.
        stop_words: words never replaced and never used as a source of insertions.

    Raises:
        ConfigurationError: an ``alpha`` or ``p_rd`` outside [0, 1], all four 0, ``num_aug`` < 1,
            ``synonyms`` not callable.
        MissingPathError: ``synonyms=None``, synonyms are needed and WordNet is not installed.

    Example::

        eda = EDA(alpha_sr=0.05, alpha_ri=0.05, alpha_rs=0.05, p_rd=0.05, num_aug=16)
        eda("the quick brown fox jumps over the lazy dog", seed=0)
        dm = TextClassificationDataModule("bert-base-uncased", train_file="train.csv", augment=eda)
    """

    def __init__(
        self,
        alpha_sr: float = 0.1,
        alpha_ri: float = 0.1,
        alpha_rs: float = 0.1,
        p_rd: float = 0.1,
        num_aug: int = 4,
        synonyms: SynonymSource | None = None,
        stop_words: Collection[str] = ENGLISH_STOP_WORDS,
    ) -> None:
        strengths = {"alpha_sr": alpha_sr, "alpha_ri": alpha_ri, "alpha_rs": alpha_rs, "p_rd": p_rd}
        problems = [p for name, value in strengths.items() if (p := check_number(name, value, low=0, high=1))]
        if not problems and not any(strengths.values()):
            problems.append(
                "`alpha_sr`, `alpha_ri`, `alpha_rs` and `p_rd` are all 0: EDA would change nothing; set one in (0, 1]."
            )
        if problem := check_number("num_aug", num_aug, low=1, integer=True):
            problems.append(problem)
        if synonyms is not None and not callable(synonyms):
            problems.append(
                f"`synonyms` must be a callable from a word to its synonyms, or None (WordNet), got {synonyms!r}."
            )
        if isinstance(stop_words, str) or not all(isinstance(word, str) for word in stop_words):
            problems.append(f"`stop_words` must be a collection of words, got {stop_words!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.alpha_sr, self.alpha_ri, self.alpha_rs, self.p_rd = alpha_sr, alpha_ri, alpha_rs, p_rd
        self.num_aug = num_aug
        self.stop_words = frozenset(word.lower() for word in stop_words)
        if synonyms is None and (alpha_sr > 0 or alpha_ri > 0):
            synonyms = WordNetSynonyms()
        self.synonyms: SynonymSource = synonyms if synonyms is not None else (lambda word: [])
        strength = {"synonym_replacement": alpha_sr, "random_insertion": alpha_ri, "random_swap": alpha_rs}
        self.operations: tuple[Operation, ...] = tuple(
            op for op in OPERATIONS if (p_rd if op == "random_deletion" else strength[op]) > 0
        )

    def __repr__(self) -> str:
        return (
            f"EDA(alpha_sr={self.alpha_sr}, alpha_ri={self.alpha_ri}, alpha_rs={self.alpha_rs}, "
            f"p_rd={self.p_rd}, num_aug={self.num_aug})"
        )

    def __call__(self, text: str, seed: int | str) -> str:
        """One augmented text: an operation picked with ``seed``, applied with ``seed``; the same text for the same seed."""
        rng = random.Random(f"eda/{seed}")
        operation = rng.choice(self.operations)
        return self.apply(operation, text, rng)

    def augment(self, text: str, seed: int | str = 0) -> list[str]:
        """``num_aug`` augmented texts (the paper's ``eda(sentence)``, without the original), deterministic for ``seed``."""
        return [self(text, f"{seed}/{copy}") for copy in range(self.num_aug)]

    def counts(self, num_words: int) -> dict[Operation, int]:
        """``n = max(1, int(alpha * num_words))``: the words synonym replacement, random insertion and random swap change.

        0 for an operation switched off and for an empty text. Random deletion has no count: each
        word goes with probability ``p_rd``.
        """
        alphas: dict[Operation, float] = {
            "synonym_replacement": self.alpha_sr, "random_insertion": self.alpha_ri, "random_swap": self.alpha_rs,
        }  # fmt: skip
        return {op: max(1, int(alpha * num_words)) if alpha > 0 and num_words else 0 for op, alpha in alphas.items()}

    def apply(self, operation: Operation, text: str, rng: random.Random) -> str:
        """Apply one ``operation`` to ``text`` with ``rng`` (the text is returned as is when it has no words)."""
        words = text.split()
        if not words:
            return text
        counts = self.counts(len(words))
        if operation == "synonym_replacement":
            words = self._replace(words, counts[operation], rng)
        elif operation == "random_insertion":
            words = self._insert(words, counts[operation], rng)
        elif operation == "random_swap":
            words = self._swap(words, counts[operation], rng)
        elif operation == "random_deletion":
            words = self._delete(words, self.p_rd, rng)
        else:
            raise ConfigurationError(f"`operation` must be one of {OPERATIONS}, got {operation!r}.")
        return " ".join(words)

    # ----------------------------------------------------------------- the four operations, on word lists
    def _replace(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        candidates = list(dict.fromkeys(core for word in words if self._is_content(core := _core(word))))
        rng.shuffle(candidates)
        replaced = 0
        for candidate in candidates:
            synonyms = self._synonyms(candidate)
            if not synonyms:
                continue
            synonym = rng.choice(synonyms)
            words = [_restyle(word, synonym) if _core(word) == candidate else word for word in words]
            replaced += 1
            if replaced >= n:
                break
        return words

    def _insert(self, words: list[str], n: int, rng: random.Random) -> list[str]:
        words = list(words)
        for _ in range(n):
            candidates = [core for word in words if self._is_content(core := _core(word))]
            for _attempt in range(10):  # a few words may have no synonym
                if not candidates:
                    break
                synonyms = self._synonyms(rng.choice(candidates))
                if synonyms:
                    words.insert(rng.randint(0, len(words)), rng.choice(synonyms))
                    break
        return words

    @staticmethod
    def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
        words = list(words)
        if len(words) < 2:
            return words
        for _ in range(n):
            i, j = rng.sample(range(len(words)), 2)
            words[i], words[j] = words[j], words[i]
        return words

    @staticmethod
    def _delete(words: list[str], p: float, rng: random.Random) -> list[str]:
        if len(words) < 2:
            return list(words)
        kept = [word for word in words if rng.random() >= p]
        return kept or [rng.choice(words)]

    def _is_content(self, core: str) -> bool:
        return bool(core) and core not in self.stop_words and any(c.isalpha() for c in core)

    def _synonyms(self, word: str) -> list[str]:
        return [s for s in self.synonyms(word) if s and s != word]


def _core(word: str) -> str:
    """The word without surrounding punctuation, lower case: ``"Lord,"`` → ``"lord"``."""
    return word.strip(_PUNCTUATION).lower()


def _restyle(word: str, synonym: str) -> str:
    """``synonym`` in place of ``word``'s core, with its punctuation and capitalisation: ``("Lord,", "master")`` → ``"Master,"``."""
    stripped = word.strip(_PUNCTUATION)
    start = word.index(stripped) if stripped else 0
    if stripped.isupper() and len(stripped) > 1:
        synonym = synonym.upper()
    elif stripped[:1].isupper():
        synonym = synonym[:1].upper() + synonym[1:]
    return word[:start] + synonym + word[start + len(stripped) :]
