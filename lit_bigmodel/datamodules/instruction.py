"""`InstructionDataModule`: prompt → completion (or chat) JSONL for causal-LM fine-tuning."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from lit_bigmodel.augmentation import EDA
from lit_bigmodel.datamodules._base import DataSource, Overflow, Split, TokenizedDataModule
from lit_bigmodel.datamodules._collate import CausalLMCollator
from lit_bigmodel.datamodules._records import Record, require_keys
from lit_bigmodel.datamodules.packing import pack_examples
from lit_bigmodel.errors import ConfigurationError, DataError
from lit_bigmodel.losses import IGNORE_INDEX

_HINT = (
    "each record needs 'prompt' and 'completion' (strings), or 'messages' (a chat ending with the assistant's turn)."
)


class InstructionDataModule(TokenizedDataModule):
    """Instruction data for completion-only causal-LM fine-tuning.

    Each record (a JSONL line or a dataset row) is ``{"prompt": ..., "completion": ...}`` or
    ``{"messages": [{"role", "content"}, ...]}`` whose last message is the assistant's answer;
    chats are rendered with the tokenizer's chat template (prompt = every turn before the last,
    with the generation prompt). Prompt tokens get label -100, so only the completion (and the EOS
    token appended to it) is learned.

    Data are tokenized once (and cached on disk with ``cache_dir``), padded per batch to the
    longest row, and optionally packed: short training examples are packed into rows of
    ``max_length`` tokens with their own position ids and an attention mask that keeps them apart.
    Examples longer than ``max_length`` (default: the tokenizer's ``model_max_length``) raise an
    error naming the line (or row), unless ``overflow`` is ``"truncate"`` (cut the completion's end) or
    ``"drop"``. ``max_length`` must not exceed the model's maximum positions; the module checks that
    again at the first batch.

    Args:
        tokenizer: a tokenizer, or the local directory / hub id to load one from.
        train_file, val_file, test_file: JSONL files, or ``datasets.Dataset`` objects (in Python);
            without a validation source, ``val_fraction`` of the training split is held out with ``seed``.
        dataset: instead of files, a Hugging Face dataset: a ``DatasetDict`` (or ``Dataset``, the
            training split), a dict of ``datasets.load_dataset`` arguments such as
            ``{"path": "json", "data_files": {"train": "train.jsonl", "validation": "val.jsonl"}}``,
            or the path of a folder saved with ``save_to_disk``. Needs ``pip install datasets``.
        dataset_splits: which of the dataset's splits are ``train`` / ``val`` / ``test``; by
            default ``train``, the first of ``validation``/``valid``/``val``/``dev``, and ``test``,
            each used when present.
        packing: pack training examples into rows of ``max_length`` tokens.
        augment: an `EDA` that rewrites the prompt side of the training examples, anew every epoch:
            the ``prompt``, or the content of every ``user`` message; completions and system and
            assistant messages are never changed. Each epoch holds every training example once as
            it is and ``augment.num_aug`` times augmented. Not with ``packing``.

    Raises:
        MissingPathError: a file does not exist or is a directory.
        DataError: a file cannot be read or is not UTF-8, a line is not JSON, a record lacks the
            keys (the message names the file and line, or the dataset split and row), a dataset
            lacks the columns; a split is empty; an example is too long with ``overflow="error"``.

    Example::

        dm = InstructionDataModule("gpt2", train_file="train.jsonl", max_length=512, packing=True)
        Trainer(max_steps=100).fit(SFTModule("gpt2"), datamodule=dm)

    From a Hugging Face dataset, in Python or in the CLI's YAML::

        dm = InstructionDataModule("gpt2", dataset=load_dataset("json", data_files="train.jsonl"))
        # data:
        #   class_path: lit_bigmodel.datamodules.InstructionDataModule
        #   init_args:
        #     tokenizer: gpt2
        #     dataset: {path: json, data_files: {train: train.jsonl, validation: val.jsonl}}
    """

    def __init__(
        self,
        tokenizer: str | PreTrainedTokenizerBase,
        train_file: DataSource = None,
        val_file: DataSource = None,
        test_file: DataSource = None,
        val_fraction: float = 0.1,
        max_length: int | None = None,
        overflow: Overflow = "error",
        packing: bool = False,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        dataset: Any = None,
        dataset_splits: Mapping[str, str] | None = None,
        augment: EDA | None = None,
    ) -> None:
        super().__init__(
            tokenizer, train_file, val_file, test_file, val_fraction, max_length, overflow,
            batch_size, eval_batch_size, num_workers, seed, cache_dir, dataset, dataset_splits, augment,
        )  # fmt: skip
        if packing and augment is not None:
            raise ConfigurationError(
                "`packing=True` builds its rows once, but `augment` rewrites the examples every epoch; use one of them."
            )
        if packing and self.max_length is None:
            raise ConfigurationError("`packing=True` needs `max_length` (the row length), got None.")
        if self.tokenizer.pad_token_id is None:
            raise ConfigurationError(
                "the tokenizer has no pad token and no EOS token to pad with; set `tokenizer.pad_token`."
            )
        self.packing = packing

    def required_columns(self) -> Sequence[tuple[str, ...]]:
        return (("prompt", "completion"), ("messages",))

    def columns_hint(self) -> str:
        return _HINT

    def encode(self, record: Record, where: str) -> dict[str, Any]:
        prompt, completion = self._prompt_and_completion(record, where)
        tok = self.tokenizer
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        completion_ids = tok(completion, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            completion_ids = [*completion_ids, tok.eos_token_id]
        if not completion_ids:
            raise DataError(f"{where}: the completion is empty.")
        return {
            "input_ids": prompt_ids + completion_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
            "prompt_length": len(prompt_ids),
        }

    def augment_record(self, record: Record, rewrite: Callable[[str], str]) -> Record:
        if isinstance(record.get("messages"), list):
            messages = [
                {**m, "content": rewrite(m["content"])}
                if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str)
                else m
                for m in record["messages"]
            ]
            return {**record, "messages": messages}
        if isinstance(record.get("prompt"), str):
            return {**record, "prompt": rewrite(record["prompt"])}
        return record

    def _prompt_and_completion(self, record: Record, where: str) -> tuple[str, str]:
        if record.get("messages") is not None:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects.")
            if messages[-1].get("role") != "assistant":
                raise DataError(f"{where}: the last message must be the assistant's (the completion to learn).")
            if not getattr(self.tokenizer, "chat_template", None):
                raise ConfigurationError(
                    f"{where}: chat 'messages' need a tokenizer with a chat template; this one has none."
                )
            prompt = self.tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
            full = self.tokenizer.apply_chat_template(messages, tokenize=False)
            if not isinstance(prompt, str) or not isinstance(full, str) or not full.startswith(prompt):
                raise DataError(f"{where}: the chat template does not render the prompt as a prefix of the chat.")
            completion = full[len(prompt) :]
            if self.tokenizer.eos_token and completion.endswith(self.tokenizer.eos_token):
                completion = completion[: -len(self.tokenizer.eos_token)]
            return prompt, completion
        require_keys(record, ("prompt", "completion"), where, _HINT)
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings.")
        return record["prompt"], record["completion"]

    def prepare_split(self, split: Split, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if split == "train" and self.packing:
            assert self.max_length is not None
            return list(pack_examples(examples, self.max_length))
        return examples

    def collate_fn(self, split: Split) -> Callable[[list[Any]], Any]:
        return CausalLMCollator(
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            with_prompts=split != "train",
        )
