"""Shared fixtures: tiny models built from configs, a character tokenizer, JSONL writers; no hub."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def char_tokenizer():
    from lit_bigmodel.datamodules import build_char_tokenizer

    return build_char_tokenizer("0123456789+-*= abcdefghijklmnopqrstuvwxyz", model_max_length=64)


@pytest.fixture
def tiny_gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture
def tiny_bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def addition_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 50, (n, 2), generator=generator).tolist()
    return [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in pairs]


def tiny_trainer(tmp_path: Path, **kwargs: Any):
    import lightning as L

    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
    }
    defaults.update(kwargs)
    return L.Trainer(**defaults)
