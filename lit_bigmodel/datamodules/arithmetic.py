"""A built-in offline task: integer arithmetic as instructions (``12+7=`` → ``19``), scored by exact match."""

from __future__ import annotations

import random

from lit_bigmodel.datamodules._base import Split
from lit_bigmodel.datamodules._records import Record
from lit_bigmodel.datamodules.instruction import InstructionDataModule
from lit_bigmodel.datamodules.tokenization import build_char_tokenizer
from lit_bigmodel.errors import ConfigurationError

_OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


class ArithmeticDataModule(InstructionDataModule):
    """All problems ``a op b`` with ``0 <= a, b <= max_operand``, split into disjoint train / val / test sets.

    Prompts look like ``"12+7="`` and completions like ``"19"``; a character-level tokenizer is
    built locally (no hub). The validation and test problems never occur in training, so the
    exact match that `SFTModule` reports on them measures generalisation, not memory.

    Args:
        max_operand: largest operand (99 gives 10,000 problems per operation).
        operations: any of ``"+"``, ``"-"``, ``"*"``.
        num_val, num_test: held-out problems (the rest is the training set).

    Example::

        dm = ArithmeticDataModule(max_operand=99, num_test=1000)
        Trainer(max_steps=2000).fit(SFTModule(GPT2Config(n_layer=2, n_embd=128, n_head=4)), dm)
    """

    def __init__(
        self,
        max_operand: int = 99,
        operations: str = "+",
        num_val: int = 500,
        num_test: int = 1000,
        packing: bool = False,
        batch_size: int = 128,
        eval_batch_size: int | None = 500,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        problems = []
        if max_operand < 1:
            problems.append(f"`max_operand` must be >= 1, got {max_operand!r}.")
        if not operations or any(op not in _OPERATIONS for op in operations):
            problems.append(f"`operations` must be a non-empty string of {''.join(_OPERATIONS)!r}, got {operations!r}.")
        total = (max_operand + 1) ** 2 * len(set(operations))
        if num_val < 1 or num_test < 1 or num_val + num_test >= total:
            problems.append(
                f"`num_val` and `num_test` must be >= 1 and leave training problems out of {total}, got {num_val} and {num_test}."
            )
        if problems:
            raise ConfigurationError(" ".join(problems))
        extremes = ((max_operand, max_operand), (0, max_operand))  # the longest answers: largest, most negative
        answer_digits = max(len(str(_OPERATIONS[op](a, b))) for op in operations for a, b in extremes) + 1
        max_length = 2 * len(str(max_operand)) + 2 + answer_digits + 1
        super().__init__(
            build_char_tokenizer("0123456789+-*=", model_max_length=max_length),
            max_length=max_length,
            packing=packing,
            val_fraction=0.0,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.max_operand = max_operand
        self.operations = "".join(sorted(set(operations), key=operations.index))
        self.num_val = num_val
        self.num_test = num_test
        self._splits: dict[str, list[Record]] | None = None

    def load_records(self, split: Split) -> list[tuple[str, Record]] | None:
        if self._splits is None:
            problems = [
                {"prompt": f"{a}{op}{b}=", "completion": str(_OPERATIONS[op](a, b))}
                for op in self.operations
                for a in range(self.max_operand + 1)
                for b in range(self.max_operand + 1)
            ]
            random.Random(self.seed).shuffle(problems)
            self._splits = {
                "val": problems[: self.num_val],
                "test": problems[self.num_val : self.num_val + self.num_test],
                "train": problems[self.num_val + self.num_test :],
            }
        return [(f"{split} problem {i}", record) for i, record in enumerate(self._splits[split])]
