"""One SeqGAN discriminator update (the paper's CNN, 64 rows of 20 tokens, Adam 1e-4, L2 0.2 on the
output layer): milliseconds per update for each implementation, measured in one run.

The paper's run makes ~986,000 of these updates (3,150 D epochs of 313), so this figure × 986,000
is the floor of its wall time. Harnesses:

- ``plain_eager``: the eager update as `SeqGANModule` made it before graphs (``impl="conv"``:
  one ``conv1d`` per filter width, PyTorch's default Adam) — the reference;
- ``eager_<impl>``: the update written once (`GraphedUpdate` with ``enabled=False``), fused Adam on a GPU;
- ``graph_<impl>`` (CUDA only): the same update captured as one CUDA graph and replayed
  (``cuda_graphs=True``), for ``impl`` in ``conv`` and ``unfold``.

It also checks that the replayed graph computes what the eager update computes (dropout 0,
20 updates: max |Δ parameter|). Writes ``benchmarks/results/seqgan_dstep_<device>.json``.

    python benchmarks/seqgan_dstep.py                         # ~1 minute on a 2-core CPU
    python benchmarks/seqgan_dstep.py --matmul-precision high  # TF32 matmuls on a GPU
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import time

import torch

from lit_bigmodel.cuda_graphs import GraphedUpdate
from lit_bigmodel.losses import discriminator_loss
from lit_bigmodel.nets import CNNDiscriminator

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# 50 × 3 pretraining epochs + 200 × 5 × 3 adversarial epochs, each 20,000 rows in 313 updates (the last of 32 rows)
PAPER_D_UPDATES = 3150 * 313


def _loss_fn(d: CNNDiscriminator):  # type: ignore[no-untyped-def]
    return functools.partial(discriminator_loss, d)


def _time(step, batches, device: torch.device, warmup: int) -> float:  # type: ignore[no-untyped-def]
    for tokens, labels in batches[:warmup]:
        step(tokens, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens, labels in batches[warmup:]:
        step(tokens, labels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - warmup) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--updates", type=int, default=0, help="timed updates a harness (default: 2000 GPU, 20 CPU)")
    parser.add_argument("--matmul-precision", default="highest", choices=("highest", "high", "medium"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    cuda = device.type == "cuda"
    updates = args.updates or (2000 if cuda else 20)
    warmup = 20 if cuda else 3
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randint(0, 5000, (64, 20), generator=generator).to(device), torch.randint(0, 2, (64,), generator=generator).to(device))
        for _ in range(warmup + updates)
    ]  # fmt: skip
    torch.manual_seed(0)
    base = CNNDiscriminator(5000).to(device)

    results: dict[str, float] = {}
    reference = copy.deepcopy(base)
    reference.impl = "conv"
    plain = torch.optim.Adam(reference.parameters(), lr=1e-4)

    def plain_eager(tokens: torch.Tensor, labels: torch.Tensor) -> None:
        loss, _, _ = discriminator_loss(reference, tokens, labels)
        plain.zero_grad()
        loss.backward()
        plain.step()

    results["plain_eager"] = _time(plain_eager, batches, device, warmup)
    for impl in ("conv", "unfold"):
        for mode in ("eager", "graph") if cuda else ("eager",):
            d = copy.deepcopy(base)
            d.impl = impl
            update = GraphedUpdate(_loss_fn(d), torch.optim.Adam(d.parameters(), lr=1e-4, fused=cuda or None),
                                   enabled=mode == "graph")  # fmt: skip
            results[f"{mode}_{impl}"] = _time(update, batches, device, warmup)
            print(f"{mode}_{impl}: {results[f'{mode}_{impl}']:.3f} ms/update", flush=True)

    check = {}
    if cuda:  # the graph computes what the eager update computes
        for impl in ("conv", "unfold"):
            torch.manual_seed(0)
            nets = [CNNDiscriminator(5000, dropout=0.0, impl=impl).to(device) for _ in range(2)]
            nets[1].load_state_dict(nets[0].state_dict())
            pair = [GraphedUpdate(_loss_fn(n), torch.optim.Adam(n.parameters(), lr=1e-4, fused=True), enabled=e)
                    for n, e in zip(nets, (True, False))]  # fmt: skip
            for tokens, labels in batches[:20]:
                for update in pair:
                    update(tokens, labels)
            check[impl] = max(float((p - q).abs().max()) for p, q in zip(nets[0].parameters(), nets[1].parameters()))

    name = (
        torch.cuda.get_device_name(device)
        if cuda
        else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    )
    best = min((k for k in results if k != "plain_eager"), key=results.__getitem__)
    report = {
        "device": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "updates_timed": updates,
        "matmul_precision": args.matmul_precision, "ms_per_update": results,
        "speedup_vs_plain_eager": {k: results["plain_eager"] / v for k, v in results.items()},
        "paper_d_minutes": {k: v * PAPER_D_UPDATES / 60_000 for k, v in results.items()},
        "graph_vs_eager_max_abs_param_diff_after_20_updates": check, "best": best,
    }  # fmt: skip
    out = args.out or os.path.join(RESULTS, f"seqgan_dstep_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as handle:
        json.dump(report, handle, indent=2)
    print(f"\n== SeqGAN D update, 64 x 20 tokens, on {name} (matmul precision {args.matmul_precision}) ==")
    for key, ms in results.items():
        print(f"{key:>16}: {ms:8.3f} ms/update  ×{results['plain_eager'] / ms:5.2f}  "
              f"paper's D updates: {ms * PAPER_D_UPDATES / 60_000:6.1f} min")  # fmt: skip
    if check:
        print(f"graph vs eager after 20 updates, max |Δ parameter|: {check}")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
