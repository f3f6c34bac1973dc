"""`TextLinesDataModule`: SeqGAN's real-text mode — lines of text as fixed-length word sequences."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_bigmodel.datamodules._collate import stack_tokens
from lit_bigmodel.datamodules._records import check_data_file, read_bytes
from lit_bigmodel.datamodules._sampling import build_loader
from lit_bigmodel.datamodules.text import shakespeare_texts
from lit_bigmodel.errors import ConfigurationError, DataError

PAD, UNK = "<pad>", "<unk>"  # ids 0 and 1; 0 is also the generator's start token
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)*|[.,!?;:]")
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF", re.MULTILINE)


def words(line: str) -> list[str]:
    """Lower-cased words and punctuation marks of ``line``: the tokens of `TextLinesDataModule`."""
    return _WORD.findall(line.lower())


class TextLinesDataModule(L.LightningDataModule):
    """Lines of text files as word sequences of ``seq_len`` tokens, for SeqGAN on real text.

    Each line with ``min_words`` to ``seq_len`` words (punctuation marks count as words) becomes
    one sequence, padded with ``<pad>`` (id 0, also the generator's start token); longer lines are
    dropped, not cut. A seeded set of ``num_held_out`` lines is held out: `bleu_references` are
    their words, against which `SeqGANModule` scores generated text by BLEU. The vocabulary is
    the ``vocab_size - 2`` most frequent words of the training lines, then ``<unk>``. Project
    Gutenberg headers and licences (outside the ``*** START OF`` / ``*** END OF`` lines) are skipped.

    Args:
        files: text files; ``None`` uses the Shakespeare texts of the ``shakespeare`` package.
        max_lines: keep at most this many lines (the first ones, in file order), before the split.

    Raises:
        MissingPathError: a file does not exist or is a directory.
        DataError: a file cannot be read; fewer usable lines than ``num_held_out`` + one batch.
        ConfigurationError: an invalid argument.

    Example::

        dm = TextLinesDataModule(seq_len=20, vocab_size=5000)      # Shakespeare's lines
        G = LSTMGenerator(dm.vocab_size, 32, 32, seq_len=20)
        L.Trainer(max_epochs=-1).fit(SeqGANModule(G, mle_epochs=50, adv_epochs=20), dm)
    """

    def __init__(
        self,
        files: Sequence[str] | None = None,
        seq_len: int = 20,
        vocab_size: int = 5000,
        min_words: int = 4,
        num_held_out: int = 1000,
        max_lines: int | None = None,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        problems = []
        if seq_len < 2:
            problems.append(f"`seq_len` must be >= 2, got {seq_len!r}.")
        if vocab_size < 3:
            problems.append(f"`vocab_size` must be >= 3 (<pad>, <unk> and a word), got {vocab_size!r}.")
        if not 1 <= min_words <= seq_len:
            problems.append(f"`min_words` must be in [1, seq_len={seq_len}], got {min_words!r}.")
        if num_held_out < 1:
            problems.append(f"`num_held_out` must be >= 1, got {num_held_out!r}.")
        if max_lines is not None and max_lines < 2:
            problems.append(f"`max_lines` must be >= 2 or None, got {max_lines!r}.")
        if batch_size < 1:
            problems.append(f"`batch_size` must be >= 1, got {batch_size!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        paths = list(files) if files is not None else shakespeare_texts()
        if not paths:
            raise ConfigurationError("`files` must name at least one text file, got none.")
        self.paths = [check_data_file(path, "text file", needed="a text file") for path in paths]
        self.seq_len, self.vocab_size, self.min_words = seq_len, vocab_size, min_words
        self.num_held_out, self.max_lines = num_held_out, max_lines
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.oracle = None  # real text has no oracle: SeqGANModule reports BLEU instead of NLL-oracle
        self.vocab: list[str] = []
        self.bleu_references: list[list[str]] = []
        self.data: torch.Tensor | None = None

    def _lines(self) -> list[list[str]]:
        lines: list[list[str]] = []
        for path in self.paths:
            text = read_bytes(path, "text file").decode("utf-8", errors="replace")
            start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
            text = text[text.find("\n", start.end()) + 1 if start else 0 : end.start() if end else len(text)]
            for line in text.splitlines():
                tokens = words(line)
                if self.min_words <= len(tokens) <= self.seq_len:
                    lines.append(tokens)
                    if self.max_lines is not None and len(lines) == self.max_lines:
                        return lines
        return lines

    def validate_inputs(self) -> None:
        """Read the files and build the vocabulary and the sequences; raise the errors `setup` would; write nothing.

        The result is kept for `setup`.

        Example::

            TextLinesDataModule(["book.txt"], num_held_out=100).validate_inputs()   # DataError if too few lines
        """
        if self.data is not None:
            return
        lines = self._lines()
        if len(lines) < self.num_held_out + self.batch_size:
            raise DataError(
                f"{len(self.paths)} file(s) hold {len(lines)} lines of {self.min_words} to {self.seq_len} words: "
                f"fewer than `num_held_out` ({self.num_held_out}) + one batch ({self.batch_size})."
            )
        order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(self.seed)).tolist()
        held_out = set(order[: self.num_held_out])
        train = [line for i, line in enumerate(lines) if i not in held_out]
        self.bleu_references = [line for i, line in enumerate(lines) if i in held_out]
        counts = Counter(word for line in train for word in line)
        self.vocab = [PAD, UNK] + [word for word, _ in counts.most_common(self.vocab_size - 2)]
        index = {word: i for i, word in enumerate(self.vocab)}
        data = torch.zeros(len(train), self.seq_len, dtype=torch.long)  # (N, T), <pad> = 0
        for row, line in enumerate(train):
            data[row, : len(line)] = torch.tensor([index.get(word, 1) for word in line])
        self.data = data

    def setup(self, stage: str | None = None) -> None:
        self.validate_inputs()

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """Token ids ``(B, T)`` → one string of words per row, cut at the first ``<pad>``."""
        texts = []
        for row in tokens.tolist():
            out = []
            for token in row:
                if token == 0:
                    break
                out.append(self.vocab[token] if token < len(self.vocab) else UNK)
            texts.append(" ".join(out))
        return texts

    def train_dataloader(self) -> DataLoader[Any]:
        self.setup()
        assert self.data is not None
        return build_loader(
            list(self.data), batch_size=self.batch_size, collate_fn=stack_tokens, trainer=self.trainer,  # type: ignore[arg-type]
            shuffle=True, seed=self.seed, num_workers=self.num_workers,
        )  # fmt: skip
