"""SeqGAN's synthetic-data experiment (Yu et al. 2017, Table 1) with the paper's settings.

Real data: 10,000 sequences of 20 tokens sampled from the released oracle LSTM. Generator: the
paper's LSTM (vocabulary 5000, embedding and hidden 32), Adam 0.01, gradient clip 5, batch 64;
120 MLE epochs; D (the paper's CNN, embedding 64, filter widths 1–10, 15, 20, dropout 0.25, L2
0.2 on its output layer, Adam 1e-4) pretrained 50 × (fresh negatives, 3 epochs); then 200
adversarial epochs of 1 G step (16 rollouts, rollout policy updated with rate 0.8) and 5 D steps
× 3 epochs. "MLE" is the NLL-oracle of G when MLE pretraining ends, "SeqGAN" after the
adversarial epochs. Writes JSON, a learning-curve PNG and the final generator's samples (one
sequence of 20 integers a line) to ``--out``.

    python benchmarks/seqgan_oracle.py --oracle ../shared/data/seqgan_oracle_lstm.npz           # the paper run (GPU)
    python benchmarks/seqgan_oracle.py --preset cpu --oracle ../shared/data/seqgan_oracle_lstm.npz   # what fits a CPU

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
from lit_bigmodel.nets import LSTMGenerator

PRESETS = {
    "paper": {"mle_epochs": 120, "d_pretrain_rounds": 50, "d_epochs": 3, "adv_epochs": 200, "d_steps": 5, "nll_samples": 100_000, "eval_every": 5},
    # the paper's MLE phase in full, then as much of D pretraining and the adversarial phase as ~30 CPU minutes allow
    "cpu": {"mle_epochs": 120, "d_pretrain_rounds": 5, "d_epochs": 3, "adv_epochs": 20, "d_steps": 1, "nll_samples": 10_000, "eval_every": 5},
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--oracle", default=os.path.join("..", "shared", "data", "seqgan_oracle_lstm.npz"))
    parser.add_argument("--preset", choices=tuple(PRESETS), default="paper")
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "seqgan_oracle")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args()

    L.seed_everything(args.seed)
    settings = PRESETS[args.preset]
    module = SeqGANModule(LSTMGenerator(5000, 32, 32, 20), rollout_num=16, **settings)
    data = OracleDataModule(args.oracle, num_sequences=10_000, batch_size=64, seed=args.seed)
    trainer = L.Trainer(max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, precision=args.precision)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - start

    mle = [row for row in module.history if row["phase"] == "mle"]
    adversarial = [row for row in module.history if row["phase"] == "adversarial"]
    final = module.evaluate_nll_oracle(settings["nll_samples"])
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    result = {
        "device": device, "date": time.strftime("%Y-%m-%d"), "preset": args.preset, "settings": settings,
        "wall_s": wall, "mle_nll_oracle": mle[-1]["nll_oracle"] if mle else None, "seqgan_nll_oracle": final,
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
    print(f"NLL-oracle   untrained {result['untrained_nll_oracle']:.3f} | MLE {result['mle_nll_oracle']:.3f} "
          f"| SeqGAN {final:.3f}   (published: MLE 9.038, SeqGAN 8.736)")  # fmt: skip
    print(f"adversarial epochs evaluated: {len(adversarial)}; results in {args.out}")


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
