"""Multi-device trials of `lit-bigmodel tune`: the worker starts every rank and relays rank zero's reports.

The worker (the process that asks the study for trials) writes the trial's config to ``<run_dir>/trial.yaml``
and starts one ``python -m lit_bigmodel.tuning.trial_runner`` per device with ``LOCAL_RANK``, ``NODE_RANK``,
``MASTER_ADDR`` and a fresh ``MASTER_PORT`` set, so Lightning launches no process of its own and each trial
gets a new process group. Rank zero sends each ``monitor`` value over a socket pair to the worker, which
reports it to the Optuna trial and answers with the pruner's decision; `TrialPruning` broadcasts that
decision, so it is made once and every rank stops at the same step. Only the worker talks to the storage.

The worker watches every rank: when one exits with an error, the others are killed (a rank left waiting
in a collective never finishes) and the trial fails with `TrialProcessError`; an input error
(`LitBigModelError`) of a rank is raised again in the worker, which stops the study as for a
single-process trial. Rank zero writes the trial's output to the terminal; the other ranks write to
``<run_dir>/rank_<r>.log``. Each rank leaves ``<run_dir>/rank_<r>.json`` (its final ``global_step``,
the step it was pruned at, its metrics).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from lit_bigmodel import errors
from lit_bigmodel.tuning.trial import BaseConfig, TrialResult

CHANNEL_ENV = "LIT_BIGMODEL_TUNE_CHANNEL_FD"  # rank zero's end of the socket pair to the worker
_POLL_S = 0.2
EXIT_GRACE_S = 120.0  # after one rank finished, the others must exit within this many seconds
# Variables that would make Lightning pick another cluster environment than the one the worker sets up
_FOREIGN_LAUNCHER = ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "LSB_JOBID", "JSM_NAMESPACE_SIZE", "WORLD_SIZE", "RANK")


class TrialProcessError(RuntimeError):
    """A rank of a multi-device trial exited with an error or was killed; the trial fails, the study goes on."""


class TrialChannel:
    """Rank zero's stand-in for the Optuna trial: `report` sends the value to the worker, which answers
    with its pruner's decision (`should_prune`).

    Example::

        TrialPruning(TrialChannel.from_environment(), "val/loss")  # on rank zero of a trial the worker started
    """

    def __init__(self, fd: int) -> None:
        self._socket = socket.socket(fileno=fd)
        self._file = self._socket.makefile("rw", encoding="utf-8", newline="\n")
        self._prune = False

    @classmethod
    def from_environment(cls) -> TrialChannel | None:
        """The channel the worker handed to this process, or None (not rank zero of a tune trial)."""
        fd = os.environ.get(CHANNEL_ENV)
        return cls(int(fd)) if fd else None

    def report(self, value: float, step: int) -> None:
        self._file.write(json.dumps({"value": value, "step": step}) + "\n")
        self._file.flush()
        answer = self._file.readline()
        if not answer:
            raise TrialProcessError("the `lit-bigmodel tune` worker of this trial is gone.")
        reply = json.loads(answer)
        if "error" in reply:
            raise TrialProcessError(f"the worker could not report step {step}: {reply['error']}")
        self._prune = bool(reply["prune"])

    def should_prune(self) -> bool:
        return self._prune


def write_rank_report(run_dir: str, rank: int, **report: Any) -> None:
    """``<run_dir>/rank_<rank>.json``: what one rank of a trial ended with."""
    with open(os.path.join(run_dir, f"rank_{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump({"rank": rank, **report}, handle)


def run_ddp_trial(
    base: BaseConfig, values: Mapping[str, Any], run_dir: str, trial: Any, monitor: str, processes: int
) -> TrialResult:
    """Fit one trial in ``processes`` rank processes on this machine; rank zero's reports go to ``trial``.

    Raises:
        LitBigModelError: an input error of the trial (raised again from the rank that found it).
        TrialProcessError: a rank exited with an error or was killed; the other ranks have been killed.

    Example::

        result = run_ddp_trial(base, {"model.init_args.learning_rate": 1e-3}, "study/trial_0", trial, "val/loss", 2)
    """
    os.makedirs(run_dir, exist_ok=True)
    for rank in range(processes):
        for suffix in ("json", "error.json"):
            path = os.path.join(run_dir, f"rank_{rank}.{suffix}")
            if os.path.exists(path):
                os.remove(path)  # a rerun of this trial's folder must not read an earlier run's reports
    config = os.path.join(run_dir, "trial.yaml")
    with open(config, "w", encoding="utf-8") as handle:
        handle.write(base.dump(base.with_values(values)))
    command = [sys.executable, "-m", "lit_bigmodel.tuning.trial_runner", "--config", config]
    command += ["--run_dir", run_dir, "--monitor", monitor]
    worker_end, rank_end = socket.socketpair()
    ranks: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(_kill, ranks)  # last in, first out: the ranks are gone before the sockets close
        stack.enter_context(worker_end)
        stack.enter_context(rank_end)
        env = _rank_environment(processes)
        for rank in range(processes):
            rank_env = {**env, "LOCAL_RANK": str(rank)}
            output: Any = None
            if rank == 0:
                rank_env[CHANNEL_ENV] = str(rank_end.fileno())
            else:
                output = stack.enter_context(open(os.path.join(run_dir, f"rank_{rank}.log"), "w", encoding="utf-8"))
            ranks.append(
                subprocess.Popen(
                    command, env=rank_env, stdout=output, stderr=output, start_new_session=True,
                    pass_fds=(rank_end.fileno(),) if rank == 0 else (),
                )
            )  # fmt: skip
        rank_end.close()
        _serve(worker_end, ranks, trial, run_dir)
    return _read_result(run_dir, monitor)


def _rank_environment(processes: int) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in _FOREIGN_LAUNCHER}
    env.update(NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.pop("GROUP_RANK", None)
    if "OMP_NUM_THREADS" not in env:  # as torchrun: the ranks share this machine's cores
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _serve(channel: socket.socket, ranks: list[subprocess.Popen[bytes]], trial: Any, run_dir: str) -> None:
    """Answer rank zero's reports until every rank has exited; raise at the first rank that failed."""
    buffer, open_channel, first_done = b"", True, math.inf
    while True:
        if open_channel and select.select([channel], [], [], _POLL_S)[0]:
            chunk = channel.recv(65536)
            open_channel = bool(chunk)
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                channel.sendall((json.dumps(_answer(trial, json.loads(line))) + "\n").encode())
        elif not open_channel:
            time.sleep(_POLL_S)
        codes = [rank.poll() for rank in ranks]
        if any(code not in (None, 0) for code in codes):
            time.sleep(_POLL_S)  # let a rank that is failing at the same moment finish writing its error
            codes = [rank.poll() for rank in ranks]
            _kill(ranks)
            _raise_failure(codes, run_dir)
        if all(code == 0 for code in codes):
            return
        if 0 in codes:
            first_done = min(first_done, time.monotonic())
            if time.monotonic() - first_done > EXIT_GRACE_S:
                _kill(ranks)
                running = ", ".join(str(rank) for rank, code in enumerate(codes) if code is None)
                raise TrialProcessError(f"rank(s) {running} did not exit within {EXIT_GRACE_S:g} s of the others.")


def _answer(trial: Any, message: dict[str, Any]) -> dict[str, Any]:
    try:
        value = float(message["value"])
        trial.report(value if math.isfinite(value) else math.nan, int(message["step"]))
        return {"prune": bool(trial.should_prune())}
    except Exception as err:  # answered, so rank zero fails the trial instead of waiting for a reply
        return {"error": f"{type(err).__name__}: {err}"}


def _kill(ranks: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL each rank still running, with the processes it started (its own session)."""
    for rank in ranks:
        if rank.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(rank.pid, signal.SIGKILL)
    for rank in ranks:
        rank.wait()


def _raise_failure(codes: list[int | None], run_dir: str) -> None:
    failures = []
    for rank, code in enumerate(codes):
        if code is None or code == 0:
            continue
        error = _read_error(run_dir, rank)
        if error is not None and error["type"] in _INPUT_ERRORS:
            raise _INPUT_ERRORS[error["type"]](error["message"])
        how = f"was killed by signal {-code}" if code < 0 else f"exited with {code}"
        detail = f" ({error['type']}: {error['message']})" if error is not None else ""
        log = "" if rank == 0 else f"; see {os.path.join(run_dir, f'rank_{rank}.log')}"
        failures.append(f"rank {rank} {how}{detail}{log}")
    raise TrialProcessError("; ".join(failures) or f"the trial's ranks ended with {codes}.")


_INPUT_ERRORS: dict[str, type[errors.LitBigModelError]] = {
    name: value
    for name, value in vars(errors).items()
    if isinstance(value, type) and issubclass(value, errors.LitBigModelError)
}


def _read_error(run_dir: str, rank: int) -> dict[str, str] | None:
    try:
        with open(os.path.join(run_dir, f"rank_{rank}.error.json"), encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError):
        return None
    return {"type": str(loaded.get("type")), "message": str(loaded.get("message"))}


def _read_result(run_dir: str, monitor: str) -> TrialResult:
    path = os.path.join(run_dir, "rank_0.json")
    try:
        with open(path, encoding="utf-8") as handle:
            report = json.load(handle)
    except (OSError, ValueError) as err:
        raise TrialProcessError(f"rank 0 exited without writing {path} ({type(err).__name__}).") from err
    metrics = {str(name): float(value) for name, value in report["metrics"].items()}
    return TrialResult(
        value=metrics.get(monitor, math.nan),
        global_step=int(report["global_step"]),
        pruned=report["pruned_at_step"] is not None,
        metrics=metrics,
    )
