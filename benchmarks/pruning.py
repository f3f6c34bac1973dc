"""Pruning benchmark: what 50% gradual pruning costs in accuracy, and what 2:4 sparsity buys in speed.

Part 1 (any machine; about 6 minutes on a 2-core CPU): a GPT-2-shaped model (3 layers, width 128,
the `configs/sft_tiny.yaml` recipe) learns 2-digit addition with `SFTModule`, twice on the same
budget and seed: dense, and with `Pruning` taking the Linear / Conv1D weights to 50% unstructured
sparsity on Zhu & Gupta's cubic schedule (from 20% to 70% of the run, then fine-tuning). Held-out
exact match of both, their difference, and the sparsity counted from the weights are printed; so
is the dense model pruned 50% at once after training, without fine-tuning, for reference.

Part 2 (CUDA GPU only; skipped with the reason on CPU): the forward time of 2:4-sparse layers
(`to_semi_structured`: ``torch.sparse`` semi-structured weights, sparse tensor cores) against the
same layers dense, in one run with CUDA events (median of repeats): a 4096 x 4096 linear layer on
4096 rows and a GPT-2-sized MLP (768 -> 3072 -> GELU -> 768) on 16 x 1024 tokens, in float16.

    python benchmarks/pruning.py              # both parts (part 2 only on a GPU)
    python benchmarks/pruning.py --quick      # a short smoke run, nothing written

Results go to ``benchmarks/results/pruning.json`` (and ``pruning_speed.png`` when part 2 ran).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import lightning as L
import torch
from torch import nn
from transformers import GPT2Config

from lit_bigmodel import SFTModule
from lit_bigmodel.callbacks.pruning import Pruning, to_semi_structured
from lit_bigmodel.datamodules import ArithmeticDataModule

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DATA = {"max_operand": 99, "num_val": 200, "num_test": 1000, "batch_size": 128, "eval_batch_size": 500}


def trainer(max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="auto", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
    )  # fmt: skip


def sft_module() -> SFTModule:
    config = GPT2Config(
        n_layer=3, n_embd=128, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return SFTModule(config, learning_rate=2e-3, weight_decay=0.1, warmup_steps=0.05)


def exact_match(module: SFTModule) -> float:
    return float(trainer(1).test(module, ArithmeticDataModule(**DATA), verbose=False)[0]["test/exact_match"])


def accuracy(args: argparse.Namespace) -> dict[str, Any]:
    runs: dict[str, dict[str, Any]] = {}
    dense_module = None
    for name in ("dense", "pruned"):
        L.seed_everything(0)
        module = sft_module()
        callbacks = []
        if name == "pruned":
            pruning = Pruning(
                "unstructured",
                final_sparsity=args.sparsity,
                start_step=args.start,
                end_step=args.end,
                frequency=args.frequency,
            )
            callbacks.append(pruning)
        start = time.perf_counter()
        trainer(args.steps, *callbacks).fit(module, ArithmeticDataModule(**DATA))
        runs[name] = {"exact_match": exact_match(module), "train_s": time.perf_counter() - start}
        if name == "pruned":
            runs[name]["sparsity"] = pruning.measure_sparsity()["global"]
            runs[name]["pruned_weights"] = sum(t.weight.numel() for t in pruning.targets)
        else:
            dense_module = module
        print(f"{name}: held-out exact match {runs[name]['exact_match']:.3f} ({runs[name]['train_s']:.0f} s)")

    # reference: the trained dense model pruned to the same sparsity at once, without fine-tuning
    assert dense_module is not None
    one_shot = Pruning("unstructured", final_sparsity=args.sparsity, schedule="one_shot").prune_module(dense_module)
    runs["one_shot_after_training"] = {"exact_match": exact_match(dense_module), "sparsity": one_shot["global"]}
    return {
        "steps": args.steps,
        "schedule": {"sparsity": args.sparsity, "start": args.start, "end": args.end, "frequency": args.frequency},
        "runs": runs,
        "exact_match_drop_points": 100 * (runs["dense"]["exact_match"] - runs["pruned"]["exact_match"]),
    }


def _median_ms(forward: Any, inputs: torch.Tensor, repeats: int, inner: int = 10) -> float:
    """Median over ``repeats`` CUDA-event timings of ``inner`` forwards, in ms per forward."""
    for _ in range(5):
        forward(inputs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            forward(inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / inner)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> dict[str, Any]:
    """2:4-sparse vs dense forward time of the same (2:4-pruned) layers, float16, measured in one run."""
    dtype = torch.float16
    cases = {
        "linear_4096x4096": (
            lambda: nn.Linear(4096, 4096),
            torch.randn(4096, 4096),
        ),
        "gpt2_mlp_768_3072": (
            lambda: nn.Sequential(nn.Linear(768, 3072), nn.GELU(approximate="tanh"), nn.Linear(3072, 768)),
            torch.randn(16, 1024, 768),
        ),
    }
    results: dict[str, Any] = {}
    torch.manual_seed(0)
    for name, (make, inputs) in cases.items():
        dense = make()
        Pruning("n:m", n=2, m=4, schedule="one_shot").prune_module(dense)
        dense = dense.to(device="cuda", dtype=dtype).eval()
        sparse = make().to(device="cuda", dtype=dtype).eval()
        sparse.load_state_dict(dense.state_dict())
        converted = to_semi_structured(sparse)
        x = inputs.to(device="cuda", dtype=dtype)
        with torch.inference_mode():
            reference, output = dense(x), sparse(x)
            error = float((output - reference).abs().max() / reference.abs().max())
            dense_ms = _median_ms(dense, x, args.repeats)
            sparse_ms = _median_ms(sparse, x, args.repeats)
        results[name] = {
            "input_shape": list(inputs.shape),
            "converted_layers": converted,
            "dense_ms": dense_ms,
            "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms,
            "max_relative_error": error,
        }
        print(
            f"{name}: dense {dense_ms:.3f} ms, 2:4 sparse {sparse_ms:.3f} ms -> x{dense_ms / sparse_ms:.2f} "
            f"(max relative difference {error:.1e})"
        )
    return results


def plot(speeds: dict[str, Any], device: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(speeds)
    figure, axis = plt.subplots(figsize=(5, 3))
    axis.bar(names, [speeds[n]["speedup"] for n in names], color="tab:green")
    axis.axhline(1.0, color="gray", linestyle="--", linewidth=1)
    axis.set_ylabel("dense / 2:4-sparse forward time")
    axis.set_title(f"2:4 sparsity, float16, {device}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--start", type=float, default=0.2, help="start of the schedule, fraction of the run")
    parser.add_argument("--end", type=float, default=0.7, help="end of the schedule, fraction of the run")
    parser.add_argument("--frequency", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-accuracy", action="store_true", help="only the GPU speed part")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not a measurement")
    parser.add_argument("--out", default=os.path.join(RESULTS, "pruning.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 40, 3

    cuda = torch.cuda.is_available()
    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    started = time.perf_counter()
    if not args.skip_accuracy:
        result["accuracy"] = accuracy(args)
    if cuda and torch.cuda.get_device_capability() >= (8, 0):
        result["speed"] = speed(args)
    else:
        reason = "no CUDA GPU" if not cuda else f"{device} has compute capability < 8.0 (no sparse tensor cores)"
        result["speed"] = {"skipped": reason}
        print(f"2:4 speed part skipped: {reason}.")
    result["wall_s"] = time.perf_counter() - started

    print(f"\n== pruning benchmark on {device} ==")
    if "accuracy" in result:
        acc, runs = result["accuracy"], result["accuracy"]["runs"]
        print(
            f"held-out exact match after {acc['steps']} steps, same seed: dense {runs['dense']['exact_match']:.3f}  |  "
            f"{runs['pruned']['sparsity']:.1%} gradual unstructured {runs['pruned']['exact_match']:.3f}  "
            f"(drop {acc['exact_match_drop_points']:.1f} points)  |  dense pruned "
            f"{runs['one_shot_after_training']['sparsity']:.1%} at once, no fine-tuning "
            f"{runs['one_shot_after_training']['exact_match']:.3f}"
        )
    if "skipped" not in result["speed"]:
        for name, row in result["speed"].items():
            print(f"{name}: 2:4 sparse forward x{row['speedup']:.2f} vs dense ({device})")
    print(f"wall time {result['wall_s']:.0f} s")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.out}")
        if "skipped" not in result["speed"]:
            plot(result["speed"], device, os.path.join(os.path.dirname(args.out), "pruning_speed.png"))


if __name__ == "__main__":
    main()
