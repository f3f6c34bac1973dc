"""Training throughput of `SFTModule` against the peers, same model, same data, one invocation.

Harnesses, each in a fresh process (so peak memory and compile caches do not leak between them):

- ``raw``: a plain PyTorch loop, ``model(input_ids=x, labels=x).loss``, backward, AdamW (fused on CUDA);
- ``raw_compile``: the same with ``torch.compile(model)``;
- ``lightning``: a plain ``LightningModule`` around the same network (``training_step`` returns the HF loss);
- ``hf_trainer``: Hugging Face ``Trainer``;
- ``ours``: `SFTModule` with its defaults (chunked loss; ``torch.compile`` on CUDA);
- ``ours_eager``: `SFTModule` with ``compile=False``; ``ours_plain``: ``compile=False, chunked_loss=False``.

Every harness is timed the same way as ``shared/probes/gpu_baseline.py``, which measured the anchors
of the issue: random tokens, bf16 autocast on CUDA (float32 on CPU unless ``--precision bf16``),
the median over steps after ``--warmup`` of the time from the start of a step (forward) to the end
of its optimizer step, synchronizing CUDA at both ends. ``period`` is the median time from one step's
start to the next one's: it adds data loading and all per-step framework work. MFU = tokens/s ×
(6·N + 12·layers·width·seq) / ``--peak-tflops`` (989.4, the H100's dense bf16 peak); n/a on CPU.
Peak memory: ``torch.cuda.max_memory_allocated``, or on CPU the process's peak RSS.

The loss curves (``--loss-curves``, always on for ``--model tiny``) train SFTModule's plain path
(full logits, eager) and its fast path (as ``ours``) for ``--curve-steps`` steps on a learnable
synthetic sequence (a noisy random bigram chain), with dropout off, and plot both.

    python benchmarks/throughput.py --model tiny                        # CPU: table, ratio, loss curves
    python benchmarks/throughput.py --model gpt2 --loss-curves          # one GPU: GPT-2 124M, 16 × 1024
    python benchmarks/throughput.py --model llama1b                     # one GPU: TinyLlama shape, 4 × 2048
    python benchmarks/throughput.py --model gpt2 --strategy fsdp             # one GPU: our FSDP preset vs Lightning's
    python benchmarks/throughput.py --model tiny --devices 2 --strategy deepspeed_stage_3   # 2 CPU processes

With ``--strategy`` (ddp, fsdp, fsdp2, deepspeed_stage_2, deepspeed_stage_3; any ``--devices``) the harnesses
are ``ours_single`` (`SFTModule`, fast path, one device, no strategy: the reference), ``lightning`` (the
plain module under Lightning's strategy of that name, as ``shared/probes/gpu_strategies.py`` measured the
anchors: ``FSDPStrategy`` wrapping each transformer block; fsdp2 has no plain counterpart) and ``ours``
(`SFTModule` under our preset from `lit_bigmodel.strategies`). The table adds tokens/s per device and the
scaling efficiency: tokens/s ÷ (devices × ``ours_single`` tokens/s). On CPU the strategies are the CPU
versions (`CPUFSDPStrategy`, `CPUDeepSpeedStrategy`), plain or preset alike.

Results: ``benchmarks/results/throughput_<model>_<device>[_x<devices>][_<strategy>][_curves].json`` and ``.png``
(and ``_loss.png``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
HARNESSES = ("raw", "raw_compile", "lightning", "hf_trainer", "ours", "ours_eager", "ours_plain", "ours_single")
DEFAULT_HARNESSES = {
    "cuda": ("raw", "raw_compile", "lightning", "hf_trainer", "ours", "ours_eager"),
    "cpu": ("raw", "lightning", "hf_trainer", "ours", "ours_plain"),
}
MULTI_DEVICE_HARNESSES = ("lightning", "ours")  # the peers that run under Lightning's launcher
STRATEGIES = ("ddp", "fsdp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3")
STRATEGY_HARNESSES = ("ours_single", "lightning", "ours")  # with --strategy
# model: (batch, sequence length) of the anchors; tiny: a CPU-sized GPT-2 (2 × 128, vocabulary 8192)
SHAPES = {"gpt2": (16, 1024), "llama1b": (4, 2048), "tiny": (8, 128)}
RESULT_TAG = "THROUGHPUT_RESULT "


# ----------------------------------------------------------------------------- shared pieces
def build_config(name: str, seq: int, dropout: bool = True) -> Any:
    """The model config of ``name``; ``dropout=False`` zeroes GPT-2's dropout (the loss curves: see `run_curve`)."""
    from transformers import GPT2Config, LlamaConfig

    if name != "llama1b" and not dropout:
        config = build_config(name, seq)
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.0
        return config

    if name == "llama1b":  # TinyLlama-1.1B shape
        return LlamaConfig(
            hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
            num_key_value_heads=4, vocab_size=32000, max_position_embeddings=seq,
        )  # fmt: skip
    if name == "tiny":
        return GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=seq, vocab_size=8192)
    return GPT2Config(n_positions=seq)  # GPT-2 124M


def build_model(name: str, seq: int, meta: bool = False, dropout: bool = True) -> torch.nn.Module:
    """The network of ``name`` with the same initial weights in every harness (``meta``: shapes only)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(build_config(name, seq, dropout))
    return AutoModelForCausalLM.from_config(build_config(name, seq, dropout))


def layers_and_width(config: Any) -> tuple[int, int]:
    layers = getattr(config, "n_layer", None) or config.num_hidden_layers
    return layers, getattr(config, "n_embd", None) or config.hidden_size


def random_tokens(vocab: int, rows: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (rows, seq), generator=generator)


def bigram_chain(vocab: int, rows: int, seq: int, noise: float = 0.1) -> torch.Tensor:
    """Rows of a random bigram chain: the next token is ``table[token]``, or a random one with prob. ``noise``."""
    generator = torch.Generator().manual_seed(2)
    table = torch.randperm(vocab, generator=generator)
    out = torch.empty(rows, seq, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab, (rows,), generator=generator)
    for t in range(1, seq):
        jump = torch.rand(rows, generator=generator) < noise
        out[:, t] = torch.where(jump, torch.randint(0, vocab, (rows,), generator=generator), table[out[:, t - 1]])
    return out


class TokenRows(torch.utils.data.Dataset):
    """``{"input_ids", "labels"}`` rows (every token labelled), as the probes feed the peers."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[index], "labels": self.data[index]}


class StepClock:
    """Median step time (start of forward to end of optimizer step) and step period, CUDA-synchronized."""

    def __init__(self, warmup: int, cuda: bool) -> None:
        self.warmup, self.cuda = warmup, cuda
        self.steps: list[float] = []
        self.periods: list[float] = []
        self._count = 0
        self._start: float | None = None

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        if self._start is not None and self._count > self.warmup:
            self.periods.append(now - self._start)
        self._start = now

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        assert self._start is not None
        if self._count >= self.warmup:
            self.steps.append(time.perf_counter() - self._start)
        self._count += 1

    def summary(self) -> dict[str, float | None]:
        return {
            "median_step_ms": 1e3 * statistics.median(self.steps) if self.steps else None,
            "median_period_ms": 1e3 * statistics.median(self.periods) if self.periods else None,
            "timed_steps": len(self.steps),
        }


def make_strategy(name: str, ours: bool, cuda: bool, model: str, seq: int) -> Any:
    """Our preset for ``name`` (``ours``), or Lightning's strategy of that name as a plain user sets it up."""
    if ours:
        from lit_bigmodel.strategies import deepspeed_strategy, fsdp2_strategy, fsdp_strategy

        accelerator = "gpu" if cuda else "cpu"
        return {
            "ddp": lambda: "ddp",
            "fsdp": lambda: fsdp_strategy(accelerator=accelerator),
            "fsdp2": lambda: fsdp2_strategy(),
            "deepspeed_stage_2": lambda: deepspeed_strategy(2, accelerator=accelerator),
            "deepspeed_stage_3": lambda: deepspeed_strategy(3, accelerator=accelerator),
        }[name]()
    if name == "fsdp":  # as the anchor probe: FSDPStrategy(auto_wrap_policy={<block class>})
        from lightning.pytorch.strategies import FSDPStrategy

        from lit_bigmodel.strategies import CPUFSDPStrategy, no_split_module_names

        network = build_model(model, seq, meta=True)
        names = no_split_module_names(network)
        blocks = {type(m) for m in network.modules() if type(m).__name__ in names}
        return (FSDPStrategy if cuda else CPUFSDPStrategy)(auto_wrap_policy=blocks)
    if name.startswith("deepspeed") and not cuda:  # Lightning's DeepSpeedStrategy refuses a CPU
        from lit_bigmodel.strategies import CPUDeepSpeedStrategy

        return CPUDeepSpeedStrategy(stage=int(name[-1]))
    return name


def lightning_trainer(args: argparse.Namespace, steps: int, callbacks: list[Any], harness: str = "") -> Any:
    import lightning as L

    cuda = args.device == "cuda"
    precision = "bf16-mixed" if args.precision == "bf16" else "32-true"
    devices = 1 if harness == "ours_single" else args.devices
    extra: dict[str, Any] = {}
    if args.strategy and harness in MULTI_DEVICE_HARNESSES:
        extra["strategy"] = make_strategy(args.strategy, harness == "ours", cuda, args.model, args.seq)
    return L.Trainer(
        accelerator="gpu" if cuda else "cpu", devices=devices, precision=precision, max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, **extra,
    )  # fmt: skip


def lightning_clock(clock: StepClock) -> Any:
    import lightning as L

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            clock.start()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            clock.stop()

    return Clock()


def sft_module(args: argparse.Namespace, harness: str) -> Any:
    from lit_bigmodel import SFTModule

    compile_flag: bool | None = None if harness in ("ours", "ours_single") else False
    return SFTModule(
        lambda: build_model(args.model, args.seq),
        learning_rate=3e-4,
        warmup_steps=0,
        compile=compile_flag,
        chunked_loss=harness != "ours_plain",
        loss_chunk_size=args.loss_chunk_size,
        gradient_checkpointing=args.gradient_checkpointing,
    )


# ----------------------------------------------------------------------------- harnesses (one per process)
def run_harness(args: argparse.Namespace) -> dict[str, Any]:
    harness, cuda = args.child, args.device == "cuda"
    batch, seq = args.batch, args.seq
    data = random_tokens(build_config(args.model, seq).vocab_size, args.steps * batch * args.devices, seq)
    clock = StepClock(args.warmup, cuda)
    amp = args.precision == "bf16"
    device = torch.device("cuda" if cuda else "cpu")
    world_size = 1
    model_info: dict[str, Any] = {}

    if harness in ("raw", "raw_compile"):
        model = build_model(args.model, seq).to(device).train()
        model_info = describe(model, seq)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True if cuda else None)
        step = torch.compile(model) if harness == "raw_compile" else model
        for i in range(args.steps):
            x = data[i * batch : (i + 1) * batch].to(device, non_blocking=True)
            clock.start()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = step(input_ids=x, labels=x).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            clock.stop()
    elif harness == "hf_trainer":
        from transformers import Trainer, TrainerCallback, TrainingArguments

        model = build_model(args.model, seq)
        model_info = describe(model, seq)

        class Clock(TrainerCallback):
            def on_step_begin(self, *_: Any, **__: Any) -> None:
                clock.start()

            def on_step_end(self, *_: Any, **__: Any) -> None:
                clock.stop()

        training_args = TrainingArguments(
            output_dir=os.path.join(args.scratch, "hf_trainer"), per_device_train_batch_size=batch,
            max_steps=args.steps, bf16=amp, learning_rate=3e-4, lr_scheduler_type="constant",
            optim="adamw_torch_fused" if cuda else "adamw_torch", report_to="none", save_strategy="no",
            logging_strategy="no", disable_tqdm=True, dataloader_pin_memory=cuda, use_cpu=not cuda,
        )  # fmt: skip
        Trainer(model=model, args=training_args, train_dataset=TokenRows(data), callbacks=[Clock()]).train()
    else:  # Lightning harnesses
        import lightning as L

        loader = torch.utils.data.DataLoader(TokenRows(data), batch_size=batch, pin_memory=cuda)
        module: L.LightningModule
        if harness == "lightning":

            class Plain(L.LightningModule):
                def __init__(self) -> None:
                    super().__init__()
                    self.model: torch.nn.Module | None = None

                def configure_model(self) -> None:  # built here, so ZeRO-3 / FSDP can shard it at creation
                    if self.model is None:
                        self.model = build_model(args.model, seq)

                def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
                    return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

                def configure_optimizers(self) -> Any:
                    return torch.optim.AdamW(self.parameters(), lr=3e-4, fused=True if cuda else None)

            module = Plain()
        else:
            module = sft_module(args, harness)
        trainer = lightning_trainer(args, args.steps, [lightning_clock(clock)], harness)
        trainer.fit(module, loader)
        world_size = trainer.world_size
        if not trainer.is_global_zero:
            return {}
        model_info = describe(build_model(args.model, seq, meta=True), seq)  # full shapes: a sharded one has shards
    result = {"harness": harness, "world_size": world_size, **model_info, **clock.summary()}
    if args.strategy and harness in MULTI_DEVICE_HARNESSES:
        result["strategy"] = args.strategy
    step_ms = result["median_step_ms"]
    if step_ms:
        tokens_per_s = world_size * batch * seq / (step_ms / 1e3)
        result["tokens_per_s"] = tokens_per_s
        result["tokens_per_s_per_device"] = tokens_per_s / world_size
        peak = args.peak_tflops * 1e12 * world_size  # MFU per device
        result["mfu"] = tokens_per_s * result["flops_per_token"] / peak if cuda else None
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return result


def describe(model: torch.nn.Module, seq: int) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    layers, width = layers_and_width(model.config)  # type: ignore[arg-type]
    return {"params_M": params / 1e6, "flops_per_token": 6 * params + 12 * layers * width * seq}


def run_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Train SFTModule's plain or fast path on the bigram chain; per-step training losses.

    Without dropout: compiled and eager code draw dropout masks from different random streams, so with
    dropout the two runs would follow different trajectories whatever the loss computation does.
    """
    import lightning as L

    path = args.child.removeprefix("curve_")
    vocab = build_config(args.model, args.seq).vocab_size
    data = bigram_chain(vocab, args.curve_steps * args.batch, args.seq)
    losses: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses.append(outputs["loss"].detach())

    from lit_bigmodel import SFTModule

    fast = path == "fast"
    module = SFTModule(
        lambda: build_model(args.model, args.seq, dropout=False), learning_rate=args.curve_lr, warmup_steps=10,
        compile=None if fast else False, chunked_loss=fast, loss_chunk_size=args.loss_chunk_size,
    )  # fmt: skip
    L.seed_everything(0)
    loader = torch.utils.data.DataLoader(TokenRows(data), batch_size=args.batch, pin_memory=args.device == "cuda")
    trainer = lightning_trainer(argparse.Namespace(**{**vars(args), "devices": 1}), args.curve_steps, [Record()])
    trainer.fit(module, loader)
    return {"path": path, "losses": [float(v) for v in torch.stack(losses).float().cpu()]}


# ----------------------------------------------------------------------------- the parent: run, tabulate, plot
def launch(args: argparse.Namespace, child: str) -> dict[str, Any] | None:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child]
    for key in ("model", "batch", "seq", "steps", "warmup", "precision", "devices", "strategy", "peak_tflops",
                "loss_chunk_size", "curve_steps", "curve_lr", "scratch", "threads"):  # fmt: skip
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    found = [line[len(RESULT_TAG) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        print(f"[{child}] failed (exit {proc.returncode}):\n{tail}", flush=True)
        return None
    result = json.loads(found[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def strategy_table(results: list[dict[str, Any]], cuda: bool) -> str:
    """With ``--strategy``: per device, and against ``ours_single`` (scaling efficiency)."""
    memory = "peak mem GiB" if cuda else "peak RSS GiB"
    rows = [
        f"| harness | strategy | devices | step ms | tokens/s | tokens/s per device | MFU | {memory} | "
        "vs ours, 1 device, no strategy (scaling efficiency) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
        eff = r.get("scaling_efficiency")
        rows.append(
            f"| {r['harness']} | {r.get('strategy', '–')} | {r['world_size']} | {r['median_step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_device']:,.0f} | {mfu} | {mem:.2f} | "
            + (f"{eff:.2f}" if eff is not None else "–")
            + " |"
        )
    return "\n".join(rows)


def table(results: list[dict[str, Any]], cuda: bool) -> str:
    by_name = {r["harness"]: r for r in results}
    hf, raw = by_name.get("hf_trainer"), by_name.get("raw")
    memory = "peak mem GiB" if cuda else "peak RSS GiB"
    rows = [
        f"| harness | step ms | period ms | tokens/s | MFU | {memory} | vs HF Trainer | vs raw |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        tok = r.get("tokens_per_s")
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib"))
        rel_hf = f"{tok / hf['tokens_per_s']:.2f}×" if tok and hf and hf.get("tokens_per_s") else "–"
        rel_raw = f"{tok / raw['tokens_per_s']:.2f}×" if tok and raw and raw.get("tokens_per_s") else "–"
        period = f"{r['median_period_ms']:.1f}" if r.get("median_period_ms") else "–"
        step = f"{r['median_step_ms']:.1f}"
        rows.append(f"| {r['harness']} | {step} | {period} | {tok:,.0f} | {mfu} | {mem:.2f} | {rel_hf} | {rel_raw} |")
    return "\n".join(rows)


def plot_bars(results: list[dict[str, Any]], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["harness"] for r in results]
    values = [r["tokens_per_s"] / 1e3 for r in results]
    colors = ["tab:orange" if n.startswith("ours") else "tab:gray" for n in names]
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=colors)
    for bar, r in zip(bars, results):
        label = f"{r['tokens_per_s'] / 1e3:.1f}k"
        if r.get("mfu") is not None:
            label += f"\n{100 * r['mfu']:.1f}% MFU"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("thousand tokens / s (median step)")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, max(values) * 1.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(plain: list[float], fast: list[float], title: str, path: str, compiled: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    top.plot(plain, label="plain path (full logits, eager)", linewidth=2.5, alpha=0.6)
    top.plot(
        fast, label=f"fast path (chunked loss{', compiled' if compiled else ', eager'})", linewidth=1, linestyle="--"
    )
    top.set_ylabel("training loss")
    top.legend()
    top.set_title(title, fontsize=9)
    bottom.plot([abs(a - b) for a, b in zip(plain, fast)], color="tab:red")
    bottom.set_ylabel("|difference|")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(cuda: bool) -> dict[str, Any]:
    import lightning
    import transformers

    info: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if cuda:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--harness", nargs="+", choices=HARNESSES, help="default: all that fit the device")
    parser.add_argument("--batch", type=int, help="per-device batch (default: 16 gpt2, 4 llama1b, 8 tiny)")
    parser.add_argument("--seq", type=int, help="sequence length (default: 1024 gpt2, 2048 llama1b, 128 tiny)")
    parser.add_argument("--steps", type=int, default=30, help="steps per harness, warm-up included")
    parser.add_argument("--warmup", type=int, help="steps not timed (default: 8 on CUDA, as the probes; 5 on CPU)")
    parser.add_argument("--precision", choices=("bf16", "32"), help="default: bf16 on CUDA, 32 on CPU")
    parser.add_argument("--rounds", type=int, default=1, help="run the harnesses this many times, interleaved")
    parser.add_argument("--devices", type=int, default=1, help="> 1: ours and lightning under Lightning's launcher")
    parser.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="our preset vs Lightning's strategy of that name (default: ddp if --devices > 1)",
    )
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="the GPU's dense bf16 peak (H100: 989.4)")
    parser.add_argument("--loss-chunk-size", type=int, default=4096)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for ours* harnesses")
    parser.add_argument("--loss-curves", action="store_true", help="also train plain vs fast path (always for tiny)")
    parser.add_argument("--curves-only", action="store_true", help="only the loss curves, no throughput table")
    parser.add_argument("--curve-steps", type=int, default=200, help="0: no loss curves")
    parser.add_argument("--threads", type=int, help="CPU: torch threads per process (default: cores / devices)")
    parser.add_argument("--curve-lr", type=float, default=1e-3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per harness process")
    parser.add_argument("--scratch", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lit_bigmodel_throughput"))
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    default_batch, default_seq = SHAPES[args.model]
    args.batch = args.batch or default_batch
    args.seq = args.seq or default_seq
    args.warmup = args.warmup if args.warmup is not None else (8 if cuda else 5)
    args.precision = args.precision or ("bf16" if cuda else "32")
    if args.steps <= args.warmup + 1:
        parser.error(
            f"--steps must exceed --warmup + 1 (warm-up steps are not timed), got {args.steps} and {args.warmup}"
        )

    if args.child:  # a harness process
        if not cuda:
            torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // args.devices))
        result = run_curve(args) if args.child.startswith("curve_") else run_harness(args)
        if result:
            print(RESULT_TAG + json.dumps(result), flush=True)
        return

    started = time.perf_counter()
    if args.devices > 1 and args.strategy is None:
        args.strategy = "ddp"
    if args.strategy:
        harnesses = list(args.harness or STRATEGY_HARNESSES)
        if args.strategy == "fsdp2" and "lightning" in harnesses:
            harnesses.remove("lightning")  # FSDP2 shards in the module's configure_model: no plain counterpart
            print("fsdp2: no plain Lightning counterpart (ModelParallelStrategy needs the module to shard itself)")
    else:
        harnesses = list(args.harness or DEFAULT_HARNESSES[args.device])
    if args.curves_only:
        harnesses = []
    if args.devices > 1:
        harnesses = [h for h in harnesses if h in (*MULTI_DEVICE_HARNESSES, "ours_single")]
    device_name = torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} cores)"
    threads = None if cuda else args.threads or max(1, (os.cpu_count() or 1) // args.devices)
    print(
        f"{args.model}: batch {args.batch} × {args.seq}, {'bf16' if args.precision == 'bf16' else 'fp32'}, "
        f"{device_name}, {args.devices} device(s)" + (f", {threads} thread(s) per process" if threads else "")
    )
    runs: dict[str, list[dict[str, Any]]] = {harness: [] for harness in harnesses}
    for round_index in range(args.rounds):  # rounds interleave the harnesses, so a load change hits them all
        for harness in harnesses:
            result = launch(args, harness)
            if result is None:
                continue
            runs[harness].append(result)
            print(
                f"  {harness:<12} {result['median_step_ms']:8.1f} ms/step  {result['tokens_per_s']:>12,.0f} tokens/s"
                + (f"  (round {round_index + 1})" if args.rounds > 1 else ""),
                flush=True,
            )
    results = []
    for harness_runs in runs.values():  # per harness: the round with the median step time
        if harness_runs:
            ordered = sorted(harness_runs, key=lambda r: r["median_step_ms"])
            chosen = dict(ordered[(len(ordered) - 1) // 2])
            chosen["rounds_step_ms"] = [r["median_step_ms"] for r in harness_runs]
            results.append(chosen)
    results = [r for r in results if r.get("tokens_per_s")]  # a harness without timed steps has no figure
    by_name = {r["harness"]: r for r in results}
    if "ours_single" in by_name:
        for r in results:
            r["scaling_efficiency"] = r["tokens_per_s"] / (r["world_size"] * by_name["ours_single"]["tokens_per_s"])
    if results:
        print(strategy_table(results, cuda) if args.strategy else table(results, cuda))
    ratios = {}
    for ours in ("ours", "ours_eager", "ours_plain"):
        if ours in by_name and "raw" in by_name:
            ratios[f"{ours}/raw step time"] = by_name[ours]["median_step_ms"] / by_name["raw"]["median_step_ms"]
            print(f"{ours} / raw step time = {ratios[f'{ours}/raw step time']:.3f}")
        if ours in by_name and "hf_trainer" in by_name:
            ratios[f"{ours}/hf_trainer tokens per s"] = (
                by_name[ours]["tokens_per_s"] / by_name["hf_trainer"]["tokens_per_s"]
            )

    curves = None
    wants_curves = args.loss_curves or args.curves_only or (args.model == "tiny" and not args.strategy)
    if wants_curves and args.devices == 1 and args.curve_steps > 0:
        plain, fast = launch(args, "curve_plain"), launch(args, "curve_fast")
        if plain and fast:
            diffs = [abs(a - b) for a, b in zip(plain["losses"], fast["losses"])]
            curves = {
                "steps": len(diffs), "max_abs_diff": max(diffs), "final_plain": plain["losses"][-1],
                "final_fast": fast["losses"][-1], "plain": plain["losses"], "fast": fast["losses"],
            }  # fmt: skip
            print(
                f"loss curves over {len(diffs)} steps: plain {plain['losses'][0]:.3f} -> {plain['losses'][-1]:.3f}, "
                f"fast {fast['losses'][0]:.3f} -> {fast['losses'][-1]:.3f}, max |difference| = {max(diffs):.2e}"
            )

    os.makedirs(args.out, exist_ok=True)
    suffix = (
        (f"_x{args.devices}" if args.devices > 1 else "")
        + (f"_{args.strategy}" if args.strategy else "")
        + ("_curves" if args.curves_only else "")
    )
    stem = os.path.join(args.out, f"throughput_{args.model}_{args.device}{suffix}")
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    title = f"{args.model}, batch {args.batch} × {args.seq}, {precision}, {device_name} ×{args.devices}"
    report = {
        "model": args.model, "batch": args.batch, "seq": args.seq, "precision": args.precision,
        "devices": args.devices, "strategy": args.strategy, "device": device_name,
        "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "threads": threads,
        "peak_tflops": args.peak_tflops if cuda else None,
        "environment": environment(cuda), "results": results, "ratios": ratios, "loss_curves": curves,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": time.perf_counter() - started,
    }  # fmt: skip
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=1)
    try:
        import matplotlib  # noqa: F401  (the plots are optional: a GPU box may lack it)

        can_plot = True
    except ImportError:
        can_plot = False
        print("matplotlib is not installed: no PNG written")
    if can_plot and results:
        plot_bars(results, title, stem + ".png")
    if can_plot and curves:
        plot_curves(curves["plain"], curves["fast"], f"SFTModule plain vs fast path, {title}", stem + "_loss.png", cuda)
    print(f"wrote {stem}.json ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
