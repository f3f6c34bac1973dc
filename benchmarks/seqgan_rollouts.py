"""Batched Monte Carlo rollouts vs the plain loop of the released SeqGAN code, measured in one run.

Same generator (the paper's LSTM: vocabulary 5000, embedding and hidden 32, length 20), same
discriminator (the paper's CNN), batch 64, N = 16 rollouts. Prints both wall times, their ratio
and the mean reward of each (they estimate the same expectation), and writes
``benchmarks/results/seqgan_rollouts.json``.

    python benchmarks/seqgan_rollouts.py              # about 2 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from rollout_reference import monte_carlo_rewards_reference  # beside this script

from lit_bigmodel.nets import CNNDiscriminator, LSTMGenerator
from lit_bigmodel.rollout import monte_carlo_rewards

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _timed(device: torch.device, fn):  # type: ignore[no-untyped-def]
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rollouts", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="batched calls to time (the loop runs once)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(RESULTS, "seqgan_rollouts.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    generator = LSTMGenerator(5000, 32, 32, 20).to(device).eval()
    samples = generator.sample(args.batch)
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores, {platform.machine()})"
    )
    result: dict = {"device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                    "batch": args.batch, "rollouts": args.rollouts, "rows": args.batch * 19 * args.rollouts}  # fmt: skip
    print(f"{name}: B={args.batch}, N={args.rollouts} ({result['rows']:,} continuations of length <= 19)")
    discriminators = {
        "paper_cnn": CNNDiscriminator(5000),  # 12 filter widths, 1,720 maps: D dominates on a CPU
        "tiny_d": CNNDiscriminator(5000, 8, (1,), (1,)),  # D nearly free: the generator side alone
    }
    for label, discriminator in discriminators.items():
        discriminator = discriminator.to(device).eval()
        monte_carlo_rewards(generator, discriminator, samples, args.rollouts)  # warm-up
        runs = [
            _timed(device, lambda d=discriminator: monte_carlo_rewards(generator, d, samples, args.rollouts))
            for _ in range(args.repeats)
        ]
        batched, batched_s = min(runs, key=lambda run: run[1])
        looped, loop_s = _timed(
            device, lambda d=discriminator: monte_carlo_rewards_reference(generator, d, samples, args.rollouts)
        )
        result[label] = {"batched_s": batched_s, "loop_s": loop_s, "speedup": loop_s / batched_s,
                         "mean_reward_batched": float(batched.mean()), "mean_reward_loop": float(looped.mean())}  # fmt: skip
        print(f"  {label:>9}: batched {batched_s:7.3f} s | loop {loop_s:7.2f} s | speed-up {loop_s / batched_s:6.1f}x "
              f"| mean reward {float(batched.mean()):.4f} vs {float(looped.mean()):.4f}")  # fmt: skip
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
