"""Post-training quantization of a ``save_pretrained`` directory: evaluate, quantize with torchao, evaluate, write.

``lit-bigmodel quantize MODEL_DIR OUT --scheme S [--data CONFIG] [--group-size N] [--device D] [--overwrite]``
(or `quantize_model`) loads the float model, scores it on the test split of a datamodule (``--data``: a
fit config whose ``data:`` section names one, or a file holding only ``class_path`` / ``init_args``),
quantizes its ``nn.Linear`` layers (`lit_bigmodel.quantization.layers`), scores it again, times a
forward pass of both on the same batch, and writes a directory ``transformers`` loads back quantized.
The report says what the quantized model costs in accuracy, weight bytes and speed on this device; a
quantized model slower than the float one is said so, not hidden (torchao's int8 CPU paths often are
without ``torch.compile``).

Example::

    lit-bigmodel quantize runs/adder/model out/adder-int8 --scheme int8_weight_only --data configs/sft_tiny.yaml
    # or, in Python:
    from lit_bigmodel.quantization.ptq import quantize_model
    report = quantize_model("runs/adder/model", "out/adder-int8", "int8_weight_only", datamodule=dm)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lit_bigmodel.errors import ConfigurationError, LitBigModelError, MissingPathError
from lit_bigmodel.export import check_target
from lit_bigmodel.nets.builders import Task, build_model
from lit_bigmodel.quantization.layers import find_targets, quantize_network
from lit_bigmodel.quantization.save import save_quantized
from lit_bigmodel.quantization.schemes import SCHEMES, check_scheme, require_torchao

__all__ = ["QuantizationReport", "evaluate_network", "main", "quantize_model", "time_forward", "weight_file_bytes"]

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class QuantizationReport:
    """What `quantize_model` did and measured."""

    scheme: str
    path: str
    """The written directory."""
    layers: list[str]
    """The layers quantized."""
    skipped: dict[str, str]
    """The ``nn.Linear`` layers left in float, with the reason."""
    float_file_bytes: int
    """Bytes of the weight files in ``MODEL_DIR``."""
    quantized_file_bytes: int
    """Bytes of the weight files written."""
    float_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the float model (empty without a datamodule)."""
    quantized_metrics: dict[str, float] = field(default_factory=dict)
    """Test metrics of the quantized model, same split."""
    float_forward_ms: float | None = None
    """Median forward time of the float model on the timing batch (None: not timed)."""
    quantized_forward_ms: float | None = None
    """Median forward time of the quantized model on the same batch, eager."""
    device: str = "cpu"

    @property
    def slowdown(self) -> float | None:
        """Quantized forward time / float forward time (> 1: the quantized model is slower)."""
        if self.float_forward_ms is None or self.quantized_forward_ms is None:
            return None
        return self.quantized_forward_ms / self.float_forward_ms

    def lines(self) -> list[str]:
        """The report as lines for a terminal."""
        ratio = self.float_file_bytes / max(1, self.quantized_file_bytes)
        out = [
            f"quantized {len(self.layers)} layers with {self.scheme} ({len(self.skipped)} nn.Linear left in float) "
            f"-> {self.path}",
            f"weight files: {self.float_file_bytes:,} -> {self.quantized_file_bytes:,} bytes ({ratio:.2f}x smaller)",
        ]
        for key in sorted(set(self.float_metrics) | set(self.quantized_metrics)):
            before, after = self.float_metrics.get(key), self.quantized_metrics.get(key)
            out.append(f"{key}: float {_number(before)} -> quantized {_number(after)}")
        slowdown = self.slowdown
        if slowdown is not None:
            verdict = "SLOWER than" if slowdown > 1.05 else ("faster than" if slowdown < 0.95 else "as fast as")
            out.append(
                f"forward on {self.device.upper()} (eager): float {self.float_forward_ms:.1f} ms, quantized "
                f"{self.quantized_forward_ms:.1f} ms: {slowdown:.2f}x the time, {verdict} float"
                + (" (try torch.compile, or another scheme)" if slowdown > 1.05 else "")
            )
        return out


def quantize_model(
    model_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    scheme: str,
    *,
    datamodule: Any = None,
    task: Task | None = None,
    group_size: int | None = None,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    time_inference: bool = True,
) -> QuantizationReport:
    """Quantize the model in ``model_dir`` with ``scheme``, evaluate it before and after, and write it to ``out``.

    Args:
        model_dir: a ``save_pretrained`` directory (a float model; e.g. ``module.export(dir)``).
        out: the directory to write (empty or absent unless ``overwrite``).
        scheme: one of `SCHEMES` that runs on ``device``.
        datamodule: a LightningDataModule whose test split scores the model before and after (`SFTModule`'s
            test metrics: exact match for arithmetic, accuracy for classifiers, loss, ...). None: no scores.
        task: ``"causal_lm"`` or ``"sequence_classification"``; None: read from the config's architecture.
        group_size: weights per scale for the grouped schemes (default: the scheme's).
        device: where to quantize, evaluate and time (default: CUDA if available, else CPU).
        overwrite: replace a non-empty ``out``.
        time_inference: time one forward pass of both models (batch 8 x 64 random tokens, median of 5).

    Raises:
        ConfigurationError: an unknown scheme, one that ``device`` cannot run, a ``model_dir`` that is not a
            model (a peft adapter folder, a checkpoint), or a model with nothing to quantize.
        MissingPathError: ``model_dir`` does not exist.
        OutputExistsError: ``out`` is in the way (checked before anything loads).
    """
    device = _device(device)
    problems = [p for p in (check_scheme(scheme, device, group_size=group_size),) if p is not None]
    if task is not None and task not in ("causal_lm", "sequence_classification"):
        problems.append(f"`task` must be 'causal_lm' or 'sequence_classification', got {task!r}.")
    if problems:
        raise ConfigurationError(" ".join(problems))
    require_torchao()
    source = os.fspath(model_dir)
    task = task or _task_of(source)
    target = check_target(out, overwrite)
    network = build_model(source, task)
    dtype = SCHEMES[scheme].dtype
    network = network.to(device=device, dtype=dtype) if dtype is not None else network.to(device)
    network.eval()
    find_targets(network, scheme, group_size)  # nothing to quantize: an error before the first evaluation
    tokenizer = _tokenizer_of(source)
    timing_batch = _timing_batch(network) if time_inference else None
    float_ms = time_forward(network, timing_batch) if timing_batch is not None else None
    before = evaluate_network(network, task, datamodule, tokenizer) if datamodule is not None else {}
    layers = quantize_network(network, scheme, group_size)
    after = evaluate_network(network, task, datamodule, tokenizer) if datamodule is not None else {}
    quantized_ms = time_forward(network, timing_batch) if timing_batch is not None else None
    path = save_quantized(network, target, tokenizer, overwrite=overwrite)
    skipped = _float_linears(network)
    return QuantizationReport(
        scheme=scheme,
        path=path,
        layers=layers,
        skipped=skipped,
        float_file_bytes=weight_file_bytes(source),
        quantized_file_bytes=weight_file_bytes(path),
        float_metrics=before,
        quantized_metrics=after,
        float_forward_ms=float_ms,
        quantized_forward_ms=quantized_ms,
        device=device.type,
    )


def evaluate_network(network: nn.Module, task: Task, datamodule: Any, tokenizer: Any = None) -> dict[str, float]:
    """`SFTModule`'s test metrics of ``network`` on ``datamodule``'s test split (one device, no logger)."""
    import lightning as L

    from lit_bigmodel.sft import SFTModule

    device = next(network.parameters()).device
    module = SFTModule(lambda: network, task=task, tokenizer=tokenizer)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    results = trainer.test(module, datamodule, verbose=False)
    network.eval()
    return {key: float(value) for key, value in (results[0] if results else {}).items()}


@torch.no_grad()
def time_forward(network: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 5) -> float:
    """Median milliseconds of ``network(**batch)`` over ``repeats`` runs after one warm-up run."""
    cuda = batch["input_ids"].device.type == "cuda"
    times = []
    for index in range(repeats + 1):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        network(**batch)
        if cuda:
            torch.cuda.synchronize()
        if index:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def weight_file_bytes(directory: str | os.PathLike[str]) -> int:
    """Total bytes of the weight files (``*.safetensors``, ``*.bin``, ...) directly in ``directory``."""
    folder = os.fspath(directory)
    return sum(
        os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder) if name.endswith(_WEIGHT_FILES)
    )


def _float_linears(network: nn.Module) -> dict[str, str]:
    """The ``nn.Linear`` layers of a quantized ``network`` that hold float weights."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    return {
        name: "kept in float"
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear) and not is_traceable_wrapper_subclass(module.weight)
    }


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ConfigurationError(f"`device` must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}.") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigurationError(f"`device` must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}.")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(f"`device` is {device!r}, but this machine has no CUDA device.")
    return resolved


def _task_of(model_dir: str) -> Task:
    """The task of a model directory, from its config's architecture; errors for what is not a model directory."""
    if not os.path.exists(model_dir):
        raise MissingPathError(f"model directory {model_dir!r} does not exist.")
    if not os.path.isdir(model_dir):
        hint = (
            " (a checkpoint: write a model directory with `lit-bigmodel export CKPT DIR` first)"
            if model_dir.endswith((".ckpt", ".pt", ".pth"))
            else ""
        )
        raise ConfigurationError(f"`model_dir` must be a save_pretrained directory, got the file {model_dir!r}{hint}.")
    config_file = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_file):
        if os.path.isfile(os.path.join(model_dir, "adapter_config.json")):
            raise ConfigurationError(
                f"{model_dir!r} is a peft adapter folder, not a model: quantize the merged model "
                "(`module.export(dir)` merges the adapters; `lit-bigmodel export CKPT DIR --base BASE` too)."
            )
        raise ConfigurationError(
            f"{model_dir!r} is not a model directory: it has no config.json (write one with `module.export(dir)` "
            "or `save_pretrained`)."
        )
    with open(config_file, encoding="utf-8") as handle:
        try:
            config = json.load(handle)
        except json.JSONDecodeError as err:
            raise ConfigurationError(f"{config_file!r} is not valid JSON ({err}).") from err
    if config.get("quantization_config"):
        raise ConfigurationError(f"{model_dir!r} holds a quantized model already: quantize its float original.")
    architectures = config.get("architectures") or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return "sequence_classification"
    if any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        return "causal_lm"
    raise ConfigurationError(
        f"cannot tell the task of {model_dir!r} from its architectures {architectures}: pass task='causal_lm' or "
        "'sequence_classification' (--task)."
    )


def _tokenizer_of(model_dir: str) -> Any:
    names = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "tokenizer.model")
    if not any(os.path.isfile(os.path.join(model_dir, name)) for name in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _timing_batch(network: nn.Module) -> dict[str, torch.Tensor]:
    from lit_bigmodel.nets.builders import max_positions

    config = network.config  # type: ignore[union-attr]
    length = min(64, max_positions(network) or 64)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (8, length), generator=generator).to(next(network.parameters()).device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _load_datamodule(path: str) -> Any:
    """The datamodule a YAML file describes: a fit config's ``data:`` section, or a bare class_path / init_args."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    if not os.path.isfile(path):
        raise MissingPathError(f"--data {path!r} does not exist.")
    with open(path, encoding="utf-8") as handle:
        try:
            loaded = yaml.safe_load(handle)
        except yaml.YAMLError as err:
            raise ConfigurationError(f"--data {path!r} is not valid YAML ({err}).") from err
    section = loaded.get("data", loaded) if isinstance(loaded, dict) else None
    if not isinstance(section, dict) or "class_path" not in section:
        raise ConfigurationError(
            f"--data {path!r} must hold a `data:` section (a fit config) or `class_path` / `init_args` of a datamodule."
        )
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=LightningDataModule)
    try:
        return parser.instantiate_classes(parser.parse_object({"data": section})).data
    except Exception as err:  # jsonargparse reports a bad class or argument as several kinds of errors
        first = (str(err).strip().splitlines() or [""])[0]
        raise ConfigurationError(f"--data {path!r}: {first}") from err


def main(argv: list[str] | None = None) -> None:
    """``lit-bigmodel quantize MODEL_DIR OUT --scheme S ...``; input errors print one line and exit with status 2."""
    parser = argparse.ArgumentParser(
        prog="lit-bigmodel quantize",
        description="Quantize a save_pretrained model directory with torchao, evaluate it before and after, and "
        "write a directory transformers loads back quantized. Schemes: "
        + "; ".join(f"{s.name} ({s.summary})" for s in SCHEMES.values()),
    )
    parser.add_argument("model_dir", help="the float model's save_pretrained directory")
    parser.add_argument("out", help="output directory (must be empty or absent unless --overwrite)")
    parser.add_argument("--scheme", required=True, help="one of: " + ", ".join(SCHEMES))
    parser.add_argument("--group-size", type=int, help="weights per scale, grouped schemes only")
    parser.add_argument("--data", help="a fit config (its `data:` section) or a datamodule's class_path/init_args YAML")
    parser.add_argument("--task", choices=("causal_lm", "sequence_classification"), help="default: from the config")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument("--no-timing", action="store_true", help="do not time a forward pass before and after")
    parser.add_argument("--json", help="also write the report to this JSON file")
    args = parser.parse_args(argv)
    try:
        datamodule = _load_datamodule(args.data) if args.data else None
        report = quantize_model(
            args.model_dir, args.out, args.scheme, datamodule=datamodule, task=args.task,
            group_size=args.group_size, device=args.device, overwrite=args.overwrite, time_inference=not args.no_timing,
        )  # fmt: skip
    except (LitBigModelError, ImportError) as err:
        print(f"lit-bigmodel quantize: error: {err}", file=sys.stderr)
        sys.exit(2)
    for line in report.lines():
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({**asdict(report), "slowdown": report.slowdown}, handle, indent=2)
