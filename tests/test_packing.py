"""Packed rows and padding-free rows give every example the loss it has alone, under every attention path."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

from lit_bigmodel import DistillationModule, SFTModule
from lit_bigmodel.datamodules import InstructionDataModule, block_causal_mask, build_char_tokenizer, flatten_batch
from lit_bigmodel.datamodules.packing import packed_attention_inputs
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import IGNORE_INDEX
from lit_bigmodel.nets.builders import build_model
from tests.conftest import addition_rows, write_jsonl

_DECODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "max_position_embeddings": 64}
CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "gpt2": lambda **kw: GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw
    ),
    "llama": lambda **kw: LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **_DECODER, **kw),
    "qwen2": lambda **kw: Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **_DECODER, **kw),
    "mistral": lambda **kw: MistralConfig(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **_DECODER, **kw
    ),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer("0123456789+-*= abcdefghijklmnopqrstuvwxyz", model_max_length=64)


@pytest.fixture(scope="module")
def batches(tmp_path_factory, tokenizer) -> dict[str, dict[str, torch.Tensor]]:
    """The same 24 examples padded one per row (``plain``) and packed into rows of 32 tokens (``packed``)."""
    path = str(write_jsonl(tmp_path_factory.mktemp("packing") / "d.jsonl", addition_rows(24)))
    out = {}
    for name, packing in (("plain", False), ("packed", True)):
        dm = InstructionDataModule(tokenizer, train_file=path, max_length=32, val_fraction=0, packing=packing)
        dm.setup("fit")
        out[name] = dm.collate_fn("train")(dm.datasets["train"])
    assert out["packed"]["input_ids"].shape[0] < out["plain"]["input_ids"].shape[0] / 2  # rows really are shared
    return out


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position loss ``(B, T-1)`` of predicting token t + 1; 0 where the label is ignored."""
    return F.cross_entropy(
        logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )


def _by_example(
    input_ids: torch.Tensor, losses: torch.Tensor, spans: list[tuple[int, int, int]]
) -> dict[tuple[int, ...], torch.Tensor]:
    """``{example tokens: its per-token losses}`` for the spans ``(row, start, end)`` of each example."""
    return {tuple(input_ids[r, s:e].tolist()): losses[r, s : e - 1] for r, s, e in spans}


def _plain_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    return [(r, 0, int(n)) for r, n in enumerate(batch["attention_mask"].sum(1))]


def _packed_spans(batch: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
    spans = []
    for r, row in enumerate(batch["document_ids"]):
        for doc in row.unique().tolist():
            if doc >= 0:
                where = (row == doc).nonzero()[:, 0]
                spans.append((r, int(where[0]), int(where[-1]) + 1))
    return spans


def _sft(arch: str, tokenizer: Any, attention: str) -> SFTModule:
    torch.manual_seed(0)
    module = SFTModule(CONFIGS[arch](), tokenizer=tokenizer)
    module.configure_model()
    module.model.set_attn_implementation(attention)
    return module.eval()


def _assert_same_example_losses(plain: dict, other: dict) -> None:
    assert plain.keys() == other.keys()
    worst = max(float((plain[k] - other[k]).abs().max()) for k in plain)
    assert worst < 1e-5, f"per-token losses differ by up to {worst}"


def _assert_packed_rows_match_plain_rows(module, plain, packed):
    """Every example's per-token losses are the same in its packed row as in its own padded row."""
    with torch.no_grad():
        plain_losses = _token_losses(module(plain), plain["labels"])
        packed_losses = _token_losses(module(packed), packed["labels"])
    _assert_same_example_losses(
        _by_example(plain["input_ids"], plain_losses, _plain_spans(plain)),
        _by_example(packed["input_ids"], packed_losses, _packed_spans(packed)),
    )


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_packed_rows_give_each_example_its_own_loss(arch, attention, tokenizer, batches):
    module = _sft(arch, tokenizer, attention)
    plain, packed = batches["plain"], batches["packed"]
    _assert_packed_rows_match_plain_rows(module, plain, packed)
    # the training loss (mean over the same completion tokens) agrees too
    assert torch.allclose(module.compute_loss(plain), module.compute_loss(packed), atol=1e-5)


SLIDING = {  # windows of 4 tokens, shorter than the examples
    "mistral": lambda: MistralConfig(num_attention_heads=4, num_key_value_heads=2, sliding_window=4, **_DECODER),
    "qwen2-mixed": lambda: Qwen2Config(
        num_attention_heads=4,
        num_key_value_heads=2,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=1,
        **_DECODER,
    ),  # layer 0 full, layer 1 sliding
}


@pytest.mark.parametrize(
    ("arch", "attention"),
    [(arch, attention) for arch in SLIDING for attention in ("eager", "sdpa")],
)
def test_packed_rows_keep_the_sliding_window(arch, attention, tokenizer, batches):
    torch.manual_seed(0)
    module = SFTModule(SLIDING[arch](), tokenizer=tokenizer)
    module.configure_model()
    module.model.set_attn_implementation(attention)
    module.eval()
    _assert_packed_rows_match_plain_rows(module, batches["plain"], batches["packed"])


def test_packed_rows_refuse_attention_layers_they_cannot_mask():
    model = _stub_model("sdpa", torch.float32)
    model.config.layer_types = ["full_attention", "linear_attention"]  # type: ignore[union-attr]
    document_ids = torch.tensor([[0, 0, 1]])
    with pytest.raises(ConfigurationError, match=r"layer_types.*\['linear_attention'\].*packing=False"):
        packed_attention_inputs(document_ids, document_ids, model)


def test_block_causal_mask_sliding_window():
    mask = block_causal_mask(torch.tensor([[0, 0, 0, 0, 1, 1]]), sliding_window=2)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1, 1],
    ]
    with pytest.raises(ConfigurationError, match="`sliding_window` must be >= 1"):
        block_causal_mask(torch.tensor([[0]]), sliding_window=0)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(("arch", "source"), [("llama", "plain"), ("gpt2", "plain"), ("llama", "packed")])
def test_padding_free_row_gives_each_example_its_own_loss(arch, source, attention, tokenizer, batches):
    module = _sft(arch, tokenizer, attention)
    plain = batches["plain"]
    flat = flatten_batch(batches[source], max_length=32)
    bounds = flat["cu_seq_lens"].tolist()
    with torch.no_grad():
        plain_losses = _token_losses(module(plain), plain["labels"])
        flat_losses = _token_losses(module(flat), flat["labels"])
    _assert_same_example_losses(
        _by_example(plain["input_ids"], plain_losses, _plain_spans(plain)),
        _by_example(flat["input_ids"], flat_losses, [(0, s, e) for s, e in pairwise(bounds)]),
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_distillation_with_attention_maps_matches_unpacked(arch, tokenizer, batches):
    torch.manual_seed(0)
    student = CONFIGS[arch]()
    teacher = CONFIGS[arch]()
    module = DistillationModule(
        student,
        teacher,
        tokenizer=tokenizer,
        alpha=0.5,
        attention_layer_map={1: 1, 2: 2},
        hidden_layer_map={0: 0, 2: 2},
    )
    module.configure_model()
    assert module.model.config._attn_implementation == "eager"  # attention maps need eager attention
    module.eval()
    logged: list[dict[str, torch.Tensor]] = []
    module.log_dict = lambda logs, **_: logged.append(logs)  # type: ignore[method-assign]
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = module.training_step(batches["plain"], 0)
        packed = module.training_step(batches["packed"], 0)
    for name in logged[0]:
        assert torch.allclose(logged[0][name], logged[1][name], atol=1e-5), (name, logged[0][name], logged[1][name])
    assert torch.allclose(plain, packed, atol=1e-5)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_build_model_keeps_the_configs_attention_implementation(attention):
    config = CONFIGS["llama"](attn_implementation=attention)
    model = build_model(config, "causal_lm")
    assert model.config._attn_implementation == attention
    assert config._attn_implementation == attention  # the caller's config is not changed


def test_build_model_without_an_attention_implementation_takes_the_transformers_default():
    from transformers import AutoModelForCausalLM

    default = AutoModelForCausalLM.from_config(CONFIGS["llama"]()).config._attn_implementation
    assert build_model(CONFIGS["llama"](), "causal_lm").config._attn_implementation == default


def test_sft_module_honours_attn_implementation_on_its_config(tokenizer):
    module = SFTModule(CONFIGS["qwen2"](attn_implementation="eager"), tokenizer=tokenizer)
    module.configure_model()
    assert module.model.config._attn_implementation == "eager"


def test_block_causal_mask_is_additive_in_a_float_dtype():
    ids = torch.tensor([[0, 0, 1, -1]])
    allowed = block_causal_mask(ids)
    assert allowed.dtype == torch.bool
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        additive = block_causal_mask(ids, dtype=dtype)
        assert additive.dtype == dtype and additive.shape == (1, 1, 4, 4)
        assert torch.equal(additive == 0, allowed)
        assert (additive[~allowed] == torch.finfo(dtype).min).all()


def _stub_model(attention: str, dtype: torch.dtype) -> torch.nn.Module:
    model = torch.nn.Linear(2, 2).to(dtype)
    model.config = SimpleNamespace(_attn_implementation=attention)  # type: ignore[assignment]
    return model


@pytest.mark.parametrize(
    ("attention", "dtype", "mask_dtype"),
    [
        ("sdpa", torch.float32, torch.bool),
        ("eager", torch.bfloat16, torch.bfloat16),
        ("eager", torch.float32, torch.float32),
    ],
)
def test_packed_attention_inputs_fit_the_attention_implementation(attention, dtype, mask_dtype):
    document_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 0, 1, 0, 0, 0]])
    inputs = packed_attention_inputs(document_ids, position_ids, _stub_model(attention, dtype))
    assert inputs["attention_mask"].dtype == mask_dtype and inputs["attention_mask"].shape == (2, 1, 6, 6)
    assert torch.equal(inputs["position_ids"], position_ids)


def test_packed_attention_inputs_for_flash_attention_are_sequence_boundaries():
    document_ids = torch.tensor([[0, 0, 1, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    position_ids = torch.tensor([[0, 1, 0, 1, 2, 0], [0, 0, 1, 0, 0, 0]])
    inputs = packed_attention_inputs(document_ids, position_ids, _stub_model("flash_attention_2", torch.bfloat16))
    assert inputs["attention_mask"] is None  # a padding mask would send flash attention down its padded path
    # boundaries over the flattened (B·T) tokens: every example, and each padding token on its own
    assert inputs["cu_seq_lens_q"].tolist() == [0, 2, 5, 6, 7, 9, 10, 11, 12]
    assert inputs["cu_seq_lens_q"].dtype == torch.int32 and inputs["cu_seq_lens_k"] is inputs["cu_seq_lens_q"]
    assert inputs["max_length_q"] == inputs["max_length_k"] == 3


@pytest.mark.parametrize("window", [None, 2])
def test_packed_attention_inputs_for_flex_attention_are_a_block_mask(window):
    from torch.nn.attention.flex_attention import BlockMask

    model = _stub_model("flex_attention", torch.float32)
    model.config.sliding_window = window  # type: ignore[union-attr]
    document_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 1, 1, 2, -1, -1]])
    inputs = packed_attention_inputs(document_ids, document_ids.clamp(min=0), model)
    block_mask = inputs["attention_mask"]
    assert isinstance(block_mask, BlockMask) and block_mask.shape == (2, 1, 6, 6)
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(6), torch.arange(6), indexing="ij")
    allowed = block_mask.mask_mod(b, torch.zeros_like(b), q, kv)  # (B, T, T), token by token
    assert torch.equal(allowed, block_causal_mask(document_ids, sliding_window=window)[:, 0])


def test_packed_rows_under_flex_attention_match_unpacked(tokenizer, batches):
    module = _sft("llama", tokenizer, "flex_attention")
    _assert_packed_rows_match_plain_rows(module, batches["plain"], batches["packed"])
