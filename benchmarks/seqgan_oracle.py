"""SeqGAN's synthetic-data experiment (Yu et al. 2017, Table 1) with the paper's settings.

Real data: 10,000 sequences of 20 tokens sampled from the released oracle LSTM. Generator: the
paper's LSTM (vocabulary 5000, embedding and hidden 32), Adam 0.01, gradient clip 5, batch 64;
120 MLE epochs; D (the paper's CNN, embedding 64, filter widths 1–10, 15, 20, dropout 0.25, L2
0.2 on its output layer, Adam 1e-4) pretrained 50 × (fresh negatives, 3 epochs); then 200
adversarial epochs of 1 G step (16 rollouts, rollout policy updated with rate 0.8) and 5 D steps
× 3 epochs. "MLE" is the NLL-oracle of G when MLE pretraining ends, "SeqGAN" after the
adversarial epochs. Writes JSON (with the wall time of each phase), a learning-curve PNG and the
final generator's samples (one sequence of 20 integers a line) to ``--out``.

The run makes ~986,000 D updates of 64 rows. The loader hands over all 10,000 real sequences at
once and `SeqGANModule` cuts its updates of 64 rows from them (``g_batch_size``, ``d_batch_size``),
so one training step is one epoch; on a GPU each D update is a replayed CUDA graph
(``cuda_graphs``; ``benchmarks/seqgan_dstep.py`` measures one update each way).

    python benchmarks/seqgan_oracle.py --oracle PATH/seqgan_oracle_lstm.npz           # the paper run (GPU)
    python benchmarks/seqgan_oracle.py --preset cpu --oracle PATH/seqgan_oracle_lstm.npz   # what fits a CPU

Published (Table 1, NLL-oracle): MLE 9.038, SeqGAN 8.736.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning as L
import torch

from lit_bigmodel import SeqGANModule
from lit_bigmodel.datamodules import OracleDataModule
from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator
from lit_bigmodel.nets.cnn_discriminator import IMPLS

PRESETS = {
    "paper": {"mle_epochs": 120, "d_pretrain_rounds": 50, "d_epochs": 3, "adv_epochs": 200, "d_steps": 5, "nll_samples": 100_000, "eval_every": 5},
    # the paper's MLE phase in full, then as much of D pretraining and the adversarial phase as an hour of a 2-core CPU allows
    "cpu": {"mle_epochs": 120, "d_pretrain_rounds": 5, "d_epochs": 3, "adv_epochs": 20, "d_steps": 1, "nll_samples": 10_000, "eval_every": 5},
    # every phase and code path once, in about a minute on a GPU: run it before the paper run
    "quick": {"mle_epochs": 2, "d_pretrain_rounds": 1, "d_epochs": 1, "adv_epochs": 2, "d_steps": 1, "nll_samples": 10_000, "eval_every": 1},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--oracle", default=None, help="the paper's oracle (default: $LIT_BIGMODEL_SEQGAN_ORACLE, else the user cache)"
    )
    parser.add_argument("--preset", choices=tuple(PRESETS), default="paper")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "seqgan_oracle")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument(
        "--loader-batch",
        type=int,
        default=10_000,
        help="rows a training step gets (default: all; updates are 64 rows either way)",
    )
    parser.add_argument(
        "--cuda-graphs",
        choices=("auto", "on", "off"),
        default="auto",
        help="D updates as CUDA graphs (auto: on a GPU at 32-true)",
    )
    parser.add_argument("--d-impl", choices=IMPLS, default="auto", help="CNNDiscriminator's convolutions")
    parser.add_argument(
        "--matmul-precision",
        choices=("highest", "high", "medium"),
        default="highest",
        help="torch.set_float32_matmul_precision (high: TF32 on a GPU)",
    )
    args = parser.parse_args()

    L.seed_everything(args.seed)
    torch.set_float32_matmul_precision(args.matmul_precision)
    settings = PRESETS[args.preset]
    graphs = args.cuda_graphs == "on" or (
        args.cuda_graphs == "auto" and torch.cuda.is_available() and args.precision == "32-true"
    )
    module = SeqGANModule(LSTMGenerator(5000, 32, 32, 20), CNNDiscriminator(5000, impl=args.d_impl), rollout_num=16,
                          g_batch_size=64, d_batch_size=64, cuda_graphs=graphs, **settings)  # fmt: skip
    data = OracleDataModule(args.oracle, num_sequences=10_000, batch_size=args.loader_batch, seed=args.seed)
    timer = PhaseTimer()
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision=args.precision, callbacks=[timer])  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start

    mle = [row for row in module.history if row["phase"] == "mle"]
    adversarial = [row for row in module.history if row["phase"] == "adversarial"]
    final = module.evaluate_nll_oracle(settings["nll_samples"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {
        "device": device, "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "settings": settings,
        "cuda_graphs": graphs, "d_impl": args.d_impl, "matmul_precision": args.matmul_precision,
        "loader_batch": args.loader_batch, "wall_s": wall, "phase_wall_s": timer.totals(),
        "optimizer_steps": trainer.global_step, "mle_nll_oracle": mle[-1]["nll_oracle"] if mle else None, "seqgan_nll_oracle": final,
        "untrained_nll_oracle": module.history[0]["nll_oracle"], "history": module.history,
        "published": {"mle": 9.038, "seqgan": 8.736},
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.preset}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    samples = module.generator.sample(settings["nll_samples"]).cpu()
    with open(os.path.join(args.out, f"{args.preset}_samples.txt"), "w") as handle:
        handle.writelines(" ".join(map(str, row)) + "\n" for row in samples.tolist())
    _plot(module.history, os.path.join(args.out, f"{args.preset}_curve.png"), settings["mle_epochs"])
    print(f"\n== SeqGAN oracle benchmark ({args.preset}) on {device}: {wall / 60:.1f} min ==")
    print("wall time by phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.totals().items()))
    print(f"NLL-oracle   untrained {result['untrained_nll_oracle']:.3f} | MLE {result['mle_nll_oracle']:.3f} "
          f"| SeqGAN {final:.3f}   (published: MLE 9.038, SeqGAN 8.736)")  # fmt: skip
    print(f"adversarial epochs evaluated: {len(adversarial)}; results in {args.out}")


class PhaseTimer(L.Callback):
    """Wall seconds spent in each phase of the schedule (read before each training step)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._phase: str | None = None
        self._since = 0.0

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch: object, batch_idx: int
    ) -> None:
        self._switch(module.schedule["phase"])  # type: ignore[union-attr]

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._switch(None)

    def _switch(self, phase: str | None) -> None:
        now = time.perf_counter()
        if self._phase is not None:
            self.spent[self._phase] = self.spent.get(self._phase, 0.0) + now - self._since
        self._phase, self._since = phase, now

    def totals(self) -> dict[str, float]:
        return {phase: round(seconds, 1) for phase, seconds in self.spent.items()}


def _plot(history: list[dict], path: str, mle_epochs: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = [], []
    for row in history:
        xs.append(row["epoch"] + (mle_epochs if row["phase"] == "adversarial" else 0))
        ys.append(row["nll_oracle"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(xs, ys, marker="o", markersize=3)
    ax.axvline(mle_epochs, color="grey", linestyle="--", label="adversarial training starts")
    ax.axhline(9.038, color="tab:orange", linestyle=":", label="paper MLE 9.038")
    ax.axhline(8.736, color="tab:green", linestyle=":", label="paper SeqGAN 8.736")
    ax.set_xlabel("epoch (MLE, then adversarial)")
    ax.set_ylabel("NLL-oracle")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
