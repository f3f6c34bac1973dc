"""Datamodules: tokenize once, cache, pad per batch or pack; and built-in offline tasks."""

from lit_bigmodel.datamodules._base import TokenizedDataModule
from lit_bigmodel.datamodules.arithmetic import ArithmeticDataModule
from lit_bigmodel.datamodules.classification import TextClassificationDataModule
from lit_bigmodel.datamodules.instruction import InstructionDataModule
from lit_bigmodel.datamodules.oracle import OracleDataModule
from lit_bigmodel.datamodules.packing import block_causal_mask, pack_examples, packed_attention_inputs
from lit_bigmodel.datamodules.padding_free import flatten_batch
from lit_bigmodel.datamodules.teacher_cache import TeacherLogitsDataModule
from lit_bigmodel.datamodules.text import PlainTextDataModule, shakespeare_texts
from lit_bigmodel.datamodules.text_lines import TextLinesDataModule
from lit_bigmodel.datamodules.tokenization import build_char_tokenizer, load_tokenizer

__all__ = [
    "ArithmeticDataModule",
    "InstructionDataModule",
    "OracleDataModule",
    "PlainTextDataModule",
    "TeacherLogitsDataModule",
    "TextClassificationDataModule",
    "TextLinesDataModule",
    "TokenizedDataModule",
    "block_causal_mask",
    "build_char_tokenizer",
    "flatten_batch",
    "load_tokenizer",
    "pack_examples",
    "packed_attention_inputs",
    "shakespeare_texts",
]
