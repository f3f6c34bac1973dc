"""The largest Llama-shaped model that trains on one device with DeepSpeed ZeRO-3, with and without CPU offload.

For each mode (``zero3``: `deepspeed_strategy(3)`; ``zero3_offload``: the same with the optimizer state and
the parameters offloaded to CPU memory), Llama shapes of growing size are trained for ``--steps`` steps
with `SFTModule` (bf16-mixed on CUDA, batch ``--batch`` × ``--seq``, gradient checkpointing), each in a
fresh process; a shape counts as trained when every step ran and the losses are finite. The ladder goes
up until a shape fails (out of memory, or ``--timeout``), then stops for that mode. It prints a table
(parameters, peak GPU memory, peak host memory, median step time) and writes
``benchmarks/results/max_model_<device>.json``.

    python benchmarks/max_model.py                                  # one GPU, the default ladder
    python benchmarks/max_model.py --shapes 1b 3b 7b --modes zero3_offload
    python benchmarks/max_model.py --cpu-smoke                      # tiny shapes on CPU (CPUDeepSpeedStrategy)

Offloading the optimizer uses DeepSpeed's CPU Adam (`SFTModule` picks it when the strategy offloads), which
DeepSpeed JIT-compiles on first use: the machine needs a C++ compiler and the ``ninja`` package.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULT_TAG = "MAX_MODEL_RESULT "
# name: (hidden, intermediate, layers, heads, kv heads) — Llama / TinyLlama / Llama-2 / CodeLlama shapes
SHAPES = {
    "tiny": (64, 128, 2, 4, 2),
    "small": (256, 512, 4, 4, 2),
    "1b": (2048, 5632, 22, 32, 4),
    "3b": (3200, 8640, 26, 32, 32),
    "7b": (4096, 11008, 32, 32, 32),
    "13b": (5120, 13824, 40, 40, 40),
    "20b": (6144, 16384, 44, 48, 8),
    "34b": (8192, 22016, 48, 64, 8),
    "70b": (8192, 28672, 80, 64, 8),
}
MODES = ("zero3", "zero3_offload")


def llama_config(name: str, seq: int) -> Any:
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads, kv = SHAPES[name]
    return LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=512 if name in ("tiny", "small") else 32000, max_position_embeddings=seq,
    )  # fmt: skip


@functools.cache  # the table asks again for each row
def count_params(name: str) -> int:
    """Parameters of the shape, counted on a network built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(llama_config(name, 128)).parameters())


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Train one shape in one mode; runs in its own process."""
    import lightning as L

    from lit_bigmodel import SFTModule
    from lit_bigmodel.strategies import deepspeed_strategy

    cuda = torch.cuda.is_available()
    offload = args.child_mode == "zero3_offload"
    strategy = deepspeed_strategy(
        3, offload_optimizer=offload, offload_parameters=offload, accelerator="gpu" if cuda else "cpu"
    )
    config = llama_config(args.child_shape, args.seq)
    module = SFTModule(config, learning_rate=1e-4, warmup_steps=0, gradient_checkpointing=True, compile=False)
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (args.steps * args.batch, args.seq), generator=generator)
    rows = [{"input_ids": row, "labels": row, "attention_mask": torch.ones_like(row)} for row in data]
    loader = torch.utils.data.DataLoader(rows, batch_size=args.batch)
    times: list[float] = []
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, *_: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, *_: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=1, strategy=strategy,
        precision="bf16-mixed" if cuda else "32-true", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[Clock()],
    )  # fmt: skip
    trainer.fit(module, loader)
    return {
        "shape": args.child_shape,
        "mode": args.child_mode,
        "params_B": count_params(args.child_shape) / 1e9,
        "steps": len(times),
        "losses": losses,
        "finite": all(map(math.isfinite, losses)),
        "median_step_s": statistics.median(times[1:] or times),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_host_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def launch(args: argparse.Namespace, shape: str, mode: str) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child-shape", shape, "--child-mode", mode]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"shape": shape, "mode": mode, "ok": False, "why": f"over {args.timeout} s"}
    found = [line[len(RESULT_TAG) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        text = proc.stdout + proc.stderr
        why = "out of memory" if "out of memory" in text.lower() or proc.returncode in (-9, 137) else "error"
        tail = "\n".join(text.strip().splitlines()[-6:])
        return {"shape": shape, "mode": mode, "ok": False, "why": why, "exit": proc.returncode, "tail": tail}
    result = json.loads(found[-1])
    result["ok"] = result["finite"] and result["steps"] == args.steps
    result["wall_s"] = time.perf_counter() - started
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), help="default: 1b up to 70b")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per shape")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes, for a check on CPU")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_shape:
        print(RESULT_TAG + json.dumps(child(args)), flush=True)
        return
    cuda = torch.cuda.is_available()
    if args.cpu_smoke:
        args.shapes, args.seq = args.shapes or ["tiny", "small"], min(args.seq, 64)
    shapes = args.shapes or [name for name in SHAPES if name not in ("tiny", "small")]
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"{device}: batch {args.batch} × {args.seq}, {args.steps} steps per shape", flush=True)
    results: list[dict[str, Any]] = []
    largest: dict[str, str | None] = {}
    for mode in args.modes:
        largest[mode] = None
        for shape in shapes:
            result = launch(args, shape, mode)
            results.append(result)
            state = "trained" if result["ok"] else f"failed ({result['why']})"
            print(f"  {mode:<14} {shape:>5}: {state}", flush=True)
            if not result["ok"]:
                break
            largest[mode] = shape
    rows = ["| mode | shape | parameters | trained | peak GPU GiB | peak host GiB | median step s |", "|---" * 7 + "|"]
    for r in results:
        gpu = f"{r['peak_gpu_gib']:.1f}" if r.get("peak_gpu_gib") is not None else "–"
        host = f"{r['peak_host_gib']:.1f}" if r.get("peak_host_gib") is not None else "–"
        step = f"{r['median_step_s']:.2f}" if r.get("median_step_s") is not None else "–"
        params = f"{count_params(r['shape']) / 1e9:.2f} B"
        ok = "yes" if r["ok"] else f"no ({r['why']})"
        rows.append(f"| {r['mode']} | {r['shape']} | {params} | {ok} | {gpu} | {host} | {step} |")
    print("\n".join(rows))
    for mode, shape in largest.items():
        print(f"largest trained with {mode}: {shape or 'none'}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"max_model_{'cuda' if cuda else 'cpu'}.json")
    with open(path, "w") as handle:
        json.dump(
            {"device": device, "seq": args.seq, "batch": args.batch, "results": results, "largest": largest},
            handle,
            indent=1,
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
