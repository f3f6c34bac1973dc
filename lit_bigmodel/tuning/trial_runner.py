"""One rank of a multi-device `lit-bigmodel tune` trial, started by the worker (`lit_bigmodel.tuning.ddp`).

Each rank parses the trial's config, fits it with `TrialPruning` (rank zero reports through the worker's
`TrialChannel`), and writes ``<run_dir>/rank_<r>.json``. An exception is also written to
``<run_dir>/rank_<r>.error.json`` (its type and message) before the rank exits with an error; a rank
whose worker is gone exits.

Example::

    LOCAL_RANK=0 MASTER_PORT=29500 python -m lit_bigmodel.tuning.trial_runner \\
        --config study/trial_0/trial.yaml --run_dir study/trial_0 --monitor val/loss
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading

from lit_bigmodel.errors import LitBigModelError

_WATCH_S = 1.0
_INPUT_ERROR_EXIT = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lit_bigmodel.tuning.trial_runner", description=__doc__)
    parser.add_argument("--config", required=True, help="The trial's config (written by the worker).")
    parser.add_argument("--run_dir", required=True, help="The trial's run folder.")
    parser.add_argument("--monitor", required=True, help="The metric reported to the study.")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    _exit_with_the_worker()
    try:
        _fit(args.config, args.run_dir, args.monitor, rank)
    except BaseException as err:
        with open(os.path.join(args.run_dir, f"rank_{rank}.error.json"), "w", encoding="utf-8") as handle:
            json.dump({"type": type(err).__name__, "message": " ".join(str(err).split())[:2000]}, handle)
        if isinstance(err, LitBigModelError):
            print(f"lit-bigmodel: error: {err}", file=sys.stderr, flush=True)
            raise SystemExit(_INPUT_ERROR_EXIT) from err
        raise


def _fit(config: str, run_dir: str, monitor: str, rank: int) -> None:
    from lit_bigmodel.tuning.ddp import TrialChannel, write_rank_report
    from lit_bigmodel.tuning.pruning import TrialPruning
    from lit_bigmodel.tuning.trial import BaseConfig, run_trial

    pruning = TrialPruning(TrialChannel.from_environment() if rank == 0 else None, monitor)
    result = run_trial(BaseConfig.load(config), {}, run_dir, [pruning])
    metrics = result.metrics if rank == 0 else {}
    write_rank_report(
        run_dir, rank, global_step=result.global_step, pruned_at_step=pruning.pruned_at_step, metrics=metrics
    )


def _exit_with_the_worker() -> None:
    """End this process when the worker that started it dies (its ranks would otherwise train on)."""
    worker = os.getppid()

    def watch() -> None:
        while os.getppid() == worker:
            threading.Event().wait(_WATCH_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


if __name__ == "__main__":
    main()
