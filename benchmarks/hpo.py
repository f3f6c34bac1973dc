"""Hyperparameter-search benchmark for `lit-bigmodel tune`: which sampler, and what ASHA pruning saves.

The task: a GPT-2-shaped model (2 layers, width 64, built from a config, no hub) learns addition of
numbers up to 49 with `SFTModule`; each trial trains from the same seed and reports the held-out exact
match of greedy generations (``val/exact_match``, 200 problems, in % below), which the study maximizes.
Searched: the learning rate (log scale, 3e-4 to 3e-2) and the warmup fraction (0 to 0.3).

Part 1, samplers: grid, random, TPE, CMA-ES and NSGA-II, each in one study of the same number of trials
(8, each 120 steps) for each of 3 sampler seeds. The grid is 4 learning rates (log-spaced over the range)
x 2 warmups, so it has exactly 8 points; the model-based samplers use small-budget settings (TPE: 4
random start-up trials; CMA-ES and NSGA-II: populations of 4). Printed: best value per sampler (mean,
sd, min-max over seeds) and the trials needed to reach a target (90% of the best value any study found).

Part 2, pruning: the same random-sampler study (12 trials, 450 steps each, validated every 50 steps)
without pruning and with ASHA (`SuccessiveHalvingPruner`, first rung at step 100, reduction factor 3).
The random sampler proposes the same 12 configurations in both, so the difference is the pruner's
alone. Printed: total training steps (the sum of every trial's ``global_step``) and best value.

    python benchmarks/hpo.py            # about 17 minutes on a 2-core CPU shared with other jobs
    python benchmarks/hpo.py --quick    # a smoke run of a few minutes, nothing written

Results: ``benchmarks/results/hpo.json``, ``hpo_samplers.png``, ``hpo_convergence.png``,
``hpo_pruning.png`` and the pictures `tune` drew for the TPE study of seed 0 (``hpo_study_*.png``).
The studies themselves go to a temporary folder, removed at the end (``--keep`` prints it instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from typing import Any

import optuna
import torch
import yaml

from lit_bigmodel.tuning import tune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
LR, WARMUP = "model.init_args.learning_rate", "model.init_args.warmup_steps"
LR_RANGE, WARMUP_RANGE = (3e-4, 3e-2), (0.0, 0.3)
MONITOR = "val/exact_match"
SAMPLERS: dict[str, Any] = {
    "grid": "grid",
    "random": "random",
    "tpe": {"name": "tpe", "n_startup_trials": 4},
    "cmaes": {"name": "cmaes", "popsize": 4},
    "nsga2": {"name": "nsga2", "population_size": 4},
}
ASHA = {"name": "asha", "min_resource": 100, "reduction_factor": 3}
TARGET_FRACTION = 0.9  # target: this fraction of the best value found by any study of part 1


def fit_config(max_steps: int, val_every: int) -> dict[str, Any]:
    """`configs/sft_tiny.yaml` made smaller: 2 layers of width 64, numbers up to 49, 200 validation problems."""
    with open(os.path.join(ROOT, "configs", "sft_tiny.yaml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config["trainer"].update(
        accelerator="cpu", max_steps=max_steps, val_check_interval=val_every, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )  # fmt: skip
    config["model"]["init_args"]["model"]["init_args"].update(n_layer=2, n_embd=64, n_head=4)
    config["data"]["init_args"].update(max_operand=49, num_val=200, num_test=8, batch_size=64)
    config.update(test_after_fit=False, export_dir=None)
    return config


def search_space(sampler: str, grid_shape: tuple[int, int]) -> dict[str, Any]:
    """The searched keys: continuous ranges, or for the grid evenly spaced points (learning rate in log space)."""
    if sampler != "grid":
        return {
            LR: {"type": "float", "low": LR_RANGE[0], "high": LR_RANGE[1], "log": True},
            WARMUP: {"type": "float", "low": WARMUP_RANGE[0], "high": WARMUP_RANGE[1]},
        }
    n_lr, n_warmup = grid_shape
    log_low, log_high = math.log10(LR_RANGE[0]), math.log10(LR_RANGE[1])
    lrs = [float(f"{10 ** (log_low + i * (log_high - log_low) / (n_lr - 1)):.3g}") for i in range(n_lr)]
    warmups = [
        round(WARMUP_RANGE[0] + i * (WARMUP_RANGE[1] - WARMUP_RANGE[0]) / (n_warmup - 1), 3) for i in range(n_warmup)
    ]
    return {LR: {"type": "categorical", "choices": lrs}, WARMUP: {"type": "categorical", "choices": warmups}}


def run_study(
    study_dir: str, *, sampler: Any, grid_shape: tuple[int, int], n_trials: int, max_steps: int, val_every: int,
    seed: int, pruner: Any = "none", outputs: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """One `tune` study; its trials in order: value (% exact match), state, steps, values and validation curve."""
    name = sampler if isinstance(sampler, str) else sampler["name"]
    search = {
        "monitor": MONITOR, "direction": "maximize", "n_trials": n_trials, "sampler": sampler, "pruner": pruner,
        "seed": seed, "params": search_space(name, grid_shape),
    }  # fmt: skip
    started = time.perf_counter()
    study = tune(fit_config(max_steps, val_every), search, study_dir=study_dir, progress_bar=False, outputs=outputs)
    trials = []
    for trial in sorted(study.trials, key=lambda t: t.number):
        trials.append(
            {
                "number": trial.number,
                "state": trial.state.name,
                "value": None if trial.value is None else 100 * trial.value,
                "global_step": trial.user_attrs.get("global_step"),
                "params": {key.rsplit(".", 1)[-1]: value for key, value in trial.params.items()},
                "curve": {int(step): 100 * value for step, value in sorted(trial.intermediate_values.items())},
            }
        )
    return {"sampler": name, "seed": seed, "trials": trials, "wall_s": time.perf_counter() - started}


def best_so_far(trials: list[dict[str, Any]]) -> list[float]:
    """After each trial, the best value of the complete trials so far (0 before the first)."""
    best, curve = 0.0, []
    for trial in trials:
        if trial["state"] == "COMPLETE" and trial["value"] is not None:
            best = max(best, trial["value"])
        curve.append(best)
    return curve


def _spread(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "sd": sd, "min": min(values), "max": max(values)}


def compare_samplers(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.samplers}
    for seed in args.seeds:
        for name in args.samplers:
            outputs = name == "tpe" and seed == args.seeds[0]  # one study draws its pictures, for the README
            run = run_study(
                os.path.join(workdir, f"{name}_seed{seed}"), sampler=SAMPLERS[name], grid_shape=args.grid,
                n_trials=args.trials, max_steps=args.steps, val_every=args.steps, seed=seed, outputs=outputs,
            )  # fmt: skip
            run["best_so_far"] = best_so_far(run["trials"])
            runs[name].append(run)
            print(f"  {name:<6} seed {seed}: best {run['best_so_far'][-1]:5.1f}%  ({run['wall_s']:.0f} s)", flush=True)
    overall = max(run["best_so_far"][-1] for name in runs for run in runs[name])
    target = TARGET_FRACTION * overall
    summary = {}
    for name, sampler_runs in runs.items():
        reached = [next((i + 1 for i, v in enumerate(r["best_so_far"]) if v >= target), None) for r in sampler_runs]
        hits = [n for n in reached if n is not None]
        summary[name] = {
            "best": _spread([r["best_so_far"][-1] for r in sampler_runs]),
            "trials_to_target": reached,
            "trials_to_target_mean": statistics.fmean(hits) if hits else None,
            "runs_reaching_target": len(hits),
        }
    return {"runs": runs, "summary": summary, "target": target, "best_overall": overall}


def compare_pruning(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"none": [], "asha": []}
    for seed in args.pruning_seeds:
        for pruner in ("none", "asha"):
            run = run_study(
                os.path.join(workdir, f"pruning_{pruner}_seed{seed}"), sampler="random", grid_shape=args.grid,
                n_trials=args.pruning_trials, max_steps=args.pruning_steps, val_every=args.pruning_val_every,
                seed=seed, pruner=ASHA if pruner == "asha" else "none",
            )  # fmt: skip
            run["total_steps"] = sum(t["global_step"] or 0 for t in run["trials"])
            run["best"] = best_so_far(run["trials"])[-1]
            run["pruned"] = sum(t["state"] == "PRUNED" for t in run["trials"])
            runs[pruner].append(run)
            print(
                f"  {pruner:<4} seed {seed}: {run['total_steps']} steps, best {run['best']:.1f}%, "
                f"{run['pruned']} pruned ({run['wall_s']:.0f} s)",
                flush=True,
            )
    pairs = list(zip(runs["none"], runs["asha"], strict=True))
    summary = {
        "steps_saved_fraction": [1 - a["total_steps"] / n["total_steps"] for n, a in pairs],
        "best_difference_points": [a["best"] - n["best"] for n, a in pairs],
    }
    summary["goal_met"] = all(
        saved >= 0.5 and diff >= -1.0
        for saved, diff in zip(summary["steps_saved_fraction"], summary["best_difference_points"], strict=True)
    )
    return {"runs": runs, "summary": summary, "asha": ASHA}


def sampler_table(result: dict[str, Any], trials: int) -> str:
    lines = [
        f"| sampler | best exact match, % (mean ± sd) | min – max | trials to {result['target']:.1f}% (of {trials}) |",
        "|---|---|---|---|",
    ]
    for name, row in result["summary"].items():
        best = row["best"]
        reached = ", ".join("–" if n is None else str(n) for n in row["trials_to_target"])
        mean = row["trials_to_target_mean"]
        to_target = f"{mean:.1f} ({reached})" if mean is not None else f"not reached ({reached})"
        lines.append(
            f"| {name} | {best['mean']:.1f} ± {best['sd']:.1f} | {best['min']:.1f} – {best['max']:.1f} | {to_target} |"
        )
    return "\n".join(lines)


def pruning_table(result: dict[str, Any]) -> str:
    lines = ["| seed | pruner | trials (pruned) | training steps | best exact match, % |", "|---|---|---|---|---|"]
    for none_run, asha_run in zip(result["runs"]["none"], result["runs"]["asha"], strict=True):
        for name, run in (("none", none_run), ("ASHA", asha_run)):
            trials = f"{len(run['trials'])} ({run['pruned']})"
            lines.append(f"| {run['seed']} | {name} | {trials} | {run['total_steps']} | {run['best']:.1f} |")
    summary = result["summary"]
    saved = ", ".join(f"{100 * s:.0f}%" for s in summary["steps_saved_fraction"])
    diff = ", ".join(f"{d:+.1f}" for d in summary["best_difference_points"])
    lines.append(f"\nASHA: {saved} fewer training steps; best value {diff} points vs no pruning.")
    return "\n".join(lines)


def plot(samplers: dict[str, Any], pruning: dict[str, Any], out_dir: str, device: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [os.path.join(out_dir, f"hpo_{name}.png") for name in ("samplers", "convergence", "pruning")]
    names = list(samplers["summary"])
    colors = {name: f"C{i}" for i, name in enumerate(names)}

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for i, name in enumerate(names):
        best = samplers["summary"][name]["best"]
        axis.bar(i, best["mean"], color=colors[name], alpha=0.75)
        axis.errorbar(
            i, best["mean"], yerr=[[best["mean"] - best["min"]], [best["max"] - best["mean"]]], color="k", capsize=4
        )
        values = [run["best_so_far"][-1] for run in samplers["runs"][name]]
        axis.scatter([i] * len(values), values, color="k", s=10, zorder=3)
    axis.axhline(samplers["target"], color="gray", linestyle="--", linewidth=1, label="target")
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("best held-out exact match, %")
    trials = len(samplers["runs"][names[0]][0]["trials"])
    axis.set_title(
        f"Best of {trials} trials per study, seeds as dots, bar = mean, whiskers = min-max\n{device}", fontsize=8
    )
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(paths[0], dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(5.5, 3.4))
    for name in names:
        curves = [run["best_so_far"] for run in samplers["runs"][name]]
        x = range(1, len(curves[0]) + 1)
        axis.plot(
            x, [statistics.fmean(c) for c in zip(*curves, strict=True)], color=colors[name], label=name, marker="."
        )
        axis.fill_between(x, [min(c) for c in zip(*curves, strict=True)], [max(c) for c in zip(*curves, strict=True)], color=colors[name], alpha=0.12)  # fmt: skip
    axis.axhline(samplers["target"], color="gray", linestyle="--", linewidth=1)
    axis.set_xlabel("trial")
    axis.set_ylabel("best exact match so far, %")
    axis.set_title(f"Best so far: mean over seeds, band = min-max\n{device}", fontsize=8)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths[1], dpi=120)
    plt.close(figure)

    figure, (curves_axis, bars_axis) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [3, 2]})
    asha_run, none_run = pruning["runs"]["asha"][0], pruning["runs"]["none"][0]
    for trial in none_run["trials"]:
        curve = trial["curve"]
        curves_axis.plot(list(curve), list(curve.values()), color="lightgray", linewidth=1)
    for trial in asha_run["trials"]:
        curve, pruned = trial["curve"], trial["state"] == "PRUNED"
        curves_axis.plot(list(curve), list(curve.values()), color="tab:red" if pruned else "tab:blue", linewidth=1.2)
    curves_axis.set_xlabel("training step")
    curves_axis.set_ylabel("held-out exact match, %")
    curves_axis.set_title(f"Seed {asha_run['seed']}: ASHA kept (blue), pruned (red); no pruning (gray)", fontsize=8)
    labels = ["none", "ASHA"]
    steps = [statistics.fmean(r["total_steps"] for r in pruning["runs"][k]) for k in ("none", "asha")]
    best = [statistics.fmean(r["best"] for r in pruning["runs"][k]) for k in ("none", "asha")]
    bars_axis.bar([0, 1], steps, color=["gray", "tab:blue"], alpha=0.8)
    bars_axis.set_xticks([0, 1], labels)
    bars_axis.set_ylabel("total training steps")
    for x, (s, b) in enumerate(zip(steps, best, strict=True)):
        bars_axis.text(x, s, f"{s:.0f} steps\nbest {b:.1f}%", ha="center", va="bottom", fontsize=8)
    bars_axis.set_ylim(0, max(steps) * 1.25)
    bars_axis.set_title(
        f"{len(none_run['trials'])} trials, mean over {len(pruning['runs']['none'])} seed(s)\n{device}", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(paths[2], dpi=120)
    plt.close(figure)
    return paths


def _quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="sampler seeds of part 1")
    parser.add_argument("--trials", type=int, default=8, help="trials per study in part 1 (the grid's size)")
    parser.add_argument("--grid", nargs=2, type=int, default=[4, 2], help="grid points: learning rates, warmups")
    parser.add_argument("--steps", type=int, default=120, help="training steps per trial in part 1")
    parser.add_argument("--pruning-seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--pruning-trials", type=int, default=12)
    parser.add_argument("--pruning-steps", type=int, default=450)
    parser.add_argument("--pruning-val-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--keep", action="store_true", help="keep the study folders (their path is printed)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets: a smoke run, nothing written")
    parser.add_argument("--out", default=os.path.join(RESULTS, "hpo.json"))
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.trials, args.grid, args.steps = [0], 4, [2, 2], 20
        args.pruning_trials, args.pruning_steps, args.pruning_val_every = 4, 200, 100
    if args.trials != args.grid[0] * args.grid[1]:
        parser.error(f"--trials {args.trials} must equal the grid's {args.grid[0]} x {args.grid[1]} points.")
    args.grid = tuple(args.grid)
    torch.set_num_threads(args.threads)
    _quiet()

    device = (
        f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), {args.threads} torch thread(s)"
    )
    workdir = tempfile.mkdtemp(prefix="hpo_")
    started = time.perf_counter()
    print(
        f"part 1: {len(args.samplers)} samplers x {len(args.seeds)} seeds x {args.trials} trials of {args.steps} steps"
    )
    samplers = compare_samplers(args, workdir)
    print(f"part 2: {args.pruning_trials} trials of {args.pruning_steps} steps, no pruning vs ASHA")
    pruning = compare_pruning(args, workdir)
    wall_s = time.perf_counter() - started

    print(
        f"\n== lit-bigmodel tune: samplers ({args.trials} trials x {args.steps} steps, seeds {args.seeds}; {device}) =="
    )
    print(f"target: {TARGET_FRACTION:.0%} of the best value of any study ({samplers['best_overall']:.1f}%)\n")
    print(sampler_table(samplers, args.trials))
    print(f"\n== ASHA vs no pruning (random sampler, {args.pruning_trials} trials x {args.pruning_steps} steps) ==\n")
    print(pruning_table(pruning))
    print(f"\nwall time {wall_s:.0f} s")

    if not args.quick:
        result = {
            "device": device, "torch": torch.__version__, "optuna": optuna.__version__,
            "date": time.strftime("%Y-%m-%d"), "wall_s": wall_s, "monitor": f"{MONITOR} (%)",
            "task": {"fit_config": fit_config(args.steps, args.steps), "search_space": search_space("tpe", args.grid),
                     "grid_space": search_space("grid", args.grid)},
            "samplers": {"settings": SAMPLERS, "trials": args.trials, "steps": args.steps, "seeds": args.seeds,
                         **samplers},
            "pruning": {"trials": args.pruning_trials, "steps": args.pruning_steps,
                        "val_every": args.pruning_val_every, "seeds": args.pruning_seeds, **pruning},
        }  # fmt: skip
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        out_dir = os.path.dirname(args.out)
        written = [args.out, *plot(samplers, pruning, out_dir, device)]
        study = os.path.join(workdir, f"tpe_seed{args.seeds[0]}")
        for picture in ("history", "parallel_coordinate", "importances"):
            if os.path.exists(os.path.join(study, f"{picture}.png")):
                written.append(os.path.join(out_dir, f"hpo_study_{picture}.png"))
                shutil.copyfile(os.path.join(study, f"{picture}.png"), written[-1])
        print("wrote " + ", ".join(os.path.relpath(path, ROOT) for path in written))
    if args.keep:
        print(f"studies kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
