"""`tune`: an Optuna study over a `lit-bigmodel fit` config; one run folder each trial.

Trials. A one-device trial is fitted in the worker's process. A trial on several devices of this machine
(``trainer.devices: 2``, ``strategy: ddp``) runs in one process per device that the worker starts and
watches (`lit_bigmodel.tuning.ddp`); only the worker talks to the storage, and a rank that fails fails the
trial. Trials on several nodes are refused: start a worker on each machine with one ``storage`` instead.

Storage. Without ``storage`` the study lives in ``<study_dir>/journal.log`` (Optuna's file journal with
file locks): it survives a crash, and several workers on one machine may share it. ``storage`` takes any
URL Optuna accepts (``postgresql://user@host/db``) for workers on many machines; each worker is started
on its own with the same command and joins the study by name.

Crashes. Each worker holds a lock file (``<study_dir>/workers/<id>.lock``) while it runs; with a URL
storage, a heartbeat is recorded every few seconds instead. A trial left RUNNING by a dead worker is
marked FAIL and its parameters are enqueued again, so rerunning the same command ends with exactly
``n_trials`` finished (complete or pruned) trials. A trial that raises, runs out of memory or ends with a
non-finite metric is recorded as FAIL (``error`` user attribute) and the study goes on (a worker stops
after ``max(3, n_trials)`` failed trials in a row); an input error (`LitBigModelError`) stops the study.
"""

from __future__ import annotations

import fcntl
import gc
import json
import math
import os
import random
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import optuna
import yaml
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from lit_bigmodel.errors import ConfigurationError, LitBigModelError, MissingPathError
from lit_bigmodel.tuning.ddp import run_ddp_trial
from lit_bigmodel.tuning.pruning import TrialPruning
from lit_bigmodel.tuning.report import write_outputs
from lit_bigmodel.tuning.settings import TuneSettings, parse_settings
from lit_bigmodel.tuning.trial import BaseConfig, run_trial

JOURNAL = "journal.log"
HEARTBEAT_S = 5  # URL storages: a trial without a heartbeat for GRACE_S is stale
GRACE_S = 20
MAX_FAILED_IN_A_ROW = 3  # a worker stops after max(this, n_trials) failed trials in a row
_POLL_S = 1.0
_FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def tune(
    config: str | os.PathLike[str] | Mapping[str, Any],
    search: str | os.PathLike[str] | Mapping[str, Any],
    *,
    study_dir: str | os.PathLike[str],
    n_trials: int | None = None,
    timeout: float | None = None,
    sampler: str | Mapping[str, Any] | None = None,
    pruner: str | Mapping[str, Any] | None = None,
    seed: int | None = None,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    progress_bar: bool = True,
    outputs: bool = True,
) -> optuna.Study:
    """Search the keys named in ``search`` over the `lit-bigmodel fit` ``config``; return the study.

    Args:
        config: a `lit-bigmodel fit` YAML file or the same as a mapping.
        search: a search file or mapping (see `lit_bigmodel.tuning.settings`); the keyword arguments
            below replace its entries when given.
        study_dir: trial run folders (``trial_<n>/``), the embedded storage, ``best.yaml`` and pictures.
        n_trials: finished (complete or pruned) trials to reach, over every worker and rerun.
        timeout: seconds after which this worker starts no new trial.
        sampler: ``grid``, ``random``, ``tpe``, ``gp``, ``cmaes``, ``nsga2`` (or ``{name: ..., **args}``).
        pruner: ``median``, ``asha``, ``hyperband``, ``none`` (or ``{name: ..., **args}``).
        seed: seeds the sampler.
        storage: an Optuna storage URL or object; None: ``<study_dir>/journal.log``.
        study_name: the study's name in the storage; default: the name of ``study_dir``.
        progress_bar: show a progress bar over trials.
        outputs: write ``best.yaml`` and the pictures and print the summary table at the end.

    Raises:
        ConfigurationError: bad search space, settings or config (a trial on several nodes, or with a
            strategy that starts its own processes), before the first trial; a ``monitor`` that the first
            trial never logged.

    Each trial records its ``global_step`` (steps trained) as a user attribute, so
    ``sum(t.user_attrs["global_step"] for t in study.trials)`` counts a study's training steps.

    Example::

        study = tune("configs/sft_tiny.yaml", "configs/tune_sft_tiny.yaml", study_dir="runs/tune", n_trials=8)
        print(study.best_params)
    """
    base = BaseConfig.load(config)
    settings = parse_settings(
        _load_search(search), has_key=base.has_key,
        n_trials=n_trials, timeout=timeout, sampler=sampler, pruner=pruner, seed=seed,
    )  # fmt: skip
    processes = base.processes()
    study_dir = os.path.abspath(os.fspath(study_dir))
    if os.path.exists(study_dir) and not os.path.isdir(study_dir):
        raise ConfigurationError(f"--study_dir {study_dir!r} is a file, not a directory; choose another --study_dir.")
    opened = _open_storage(storage, study_dir)
    os.makedirs(study_dir, exist_ok=True)
    worker = _Worker(study_dir, settings, base, embedded=storage is None, heartbeat=opened, processes=processes)
    with worker.registered():
        study = _load_study(
            opened if opened is not None else _journal(study_dir), settings, study_name or os.path.basename(study_dir)
        )
        worker.run(study, progress_bar=progress_bar)
    if outputs:
        write_outputs(study, base, settings, study_dir)
    return study


def _load_search(search: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(search, Mapping):
        return search
    path = os.fspath(search)
    if not os.path.isfile(path):
        raise MissingPathError(f"--search {path!r} does not exist.")
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise ConfigurationError(f"--search {path!r} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(loaded, Mapping):
        raise ConfigurationError(f"--search {path!r} must hold a mapping with `params` and `monitor`.")
    return loaded


def _journal(study_dir: str) -> optuna.storages.BaseStorage:
    backend = JournalFileBackend(os.path.join(study_dir, JOURNAL))
    return optuna.storages.JournalStorage(backend)


def _open_storage(
    storage: str | optuna.storages.BaseStorage | None, study_dir: str
) -> optuna.storages.BaseStorage | None:
    """The storage named by a URL (with a heartbeat), a storage object as given, or None for the journal."""
    if storage is None or isinstance(storage, optuna.storages.BaseStorage):
        return storage
    from sqlalchemy.exc import IntegrityError

    engine_kwargs = {"connect_args": {"timeout": 60}} if storage.startswith("sqlite") else {}
    try:
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        storage, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                        heartbeat_stale_trial_callback=_requeue,
                    )  # fmt: skip
            except IntegrityError:  # another worker is creating the tables of a new database right now
                if attempt == 4:
                    raise
                time.sleep(0.5 + random.random())
        raise AssertionError("unreachable")
    except Exception as err:
        detail = " ".join(str(err).split())[:300]
        raise ConfigurationError(
            f"--storage {storage!r} cannot be opened ({type(err).__name__}: {detail}); "
            "give a database URL Optuna accepts, e.g. postgresql://user:password@host:5432/db."
        ) from err


def _load_study(storage: optuna.storages.BaseStorage, settings: TuneSettings, name: str) -> optuna.Study:
    """Create the study (and enqueue ``settings.enqueue``) or join it; a different search is an error."""
    kwargs: dict[str, Any] = {
        "study_name": name, "storage": storage, "direction": settings.direction,
        "sampler": settings.make_sampler(), "pruner": settings.make_pruner(),
    }  # fmt: skip
    described = json.dumps(settings.as_dict(), sort_keys=True)
    try:
        study = optuna.create_study(load_if_exists=False, **kwargs)
        study.set_user_attr("search", described)
        for values in settings.enqueue:
            study.enqueue_trial(values)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.create_study(load_if_exists=True, **kwargs)
        stored = study.user_attrs.get("search")
        if stored is not None and stored != described:
            raise ConfigurationError(
                f"study {name!r} already exists with another search ({stored}); "
                "use another --study_dir / --study_name, or the search file it was started with."
            ) from None
    return study


def _requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Enqueue the parameters of a trial whose worker died, once."""
    if not trial.user_attrs.get("surplus"):
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


class _Worker:
    """One process's share of a study: asks trials while fewer than ``n_trials`` are finished or running."""

    def __init__(
        self,
        study_dir: str,
        settings: TuneSettings,
        base: BaseConfig,
        *,
        embedded: bool,
        heartbeat: optuna.storages.BaseStorage | None,
        processes: int = 1,
    ) -> None:
        self.study_dir = study_dir
        self.processes = processes
        self.settings = settings
        self.base = base
        self.embedded = embedded
        self.heartbeat = heartbeat if isinstance(heartbeat, optuna.storages.RDBStorage) else None
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.workers_dir = os.path.join(study_dir, "workers")

    @contextmanager
    def registered(self) -> Iterator[None]:
        """Hold this worker's lock file while it runs (the kernel releases it if the process dies)."""
        os.makedirs(self.workers_dir, exist_ok=True)
        path = os.path.join(self.workers_dir, f"{self.id}.lock")
        with open(path, "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                os.remove(path)

    @contextmanager
    def _study_lock(self) -> Iterator[None]:
        with open(os.path.join(self.study_dir, ".lock"), "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def _alive(self, worker: str | None) -> bool:
        if worker is None:
            return False  # asked and not yet claimed: claiming happens under the study lock
        path = os.path.join(self.workers_dir, f"{worker}.lock")
        try:
            with open(path, "r+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.remove(path)
            return False
        except BlockingIOError:
            return True
        except FileNotFoundError:
            return False

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # URL storages: by heartbeat
        if not self.embedded:
            return
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if not self._alive(trial.user_attrs.get("worker")):
                study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
                _requeue(study, trial)

    def _ask(self, study: optuna.Study, started: float) -> optuna.Trial | str:
        """A new trial, or ``"wait"`` (others' trials may still fail) or ``"done"``."""
        settings = self.settings
        if settings.timeout is not None and time.monotonic() - started >= settings.timeout:
            return "done"
        with self._study_lock():
            self._fail_dead_trials(study)
            trials = study.get_trials(deepcopy=False)
            finished = sum(t.state in _FINISHED for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials)
            limit = settings.n_trials
            if limit is not None and finished >= limit:
                return "done"
            if limit is not None and finished + running >= limit:
                return "wait"
            study.sampler = settings.make_sampler(len(trials))
            trial = study.ask()
            trial.set_user_attr("worker", self.id)
        if limit is not None:  # workers on other machines may have asked at the same moment
            ahead = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
            if sum(t.state in (*_FINISHED, TrialState.RUNNING) for t in ahead) >= limit:
                trial.set_user_attr("surplus", True)
                study.tell(trial, state=TrialState.FAIL)
                if "retry_of" in trial.user_attrs:
                    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.user_attrs["retry_of"]})
                return "wait"
        return trial

    def run(self, study: optuna.Study, *, progress_bar: bool) -> None:
        from tqdm.auto import tqdm

        settings = self.settings
        started = time.monotonic()
        failed = 0
        bar = tqdm(total=settings.n_trials, desc="trials", unit="trial", disable=not progress_bar, leave=True)
        try:
            while True:
                bar.n = sum(t.state in _FINISHED for t in study.get_trials(deepcopy=False))
                bar.refresh()
                trial = self._ask(study, started)
                if trial == "done":
                    break
                if trial == "wait":
                    time.sleep(_POLL_S)
                    continue
                assert isinstance(trial, optuna.Trial)
                failed = failed + 1 if self._run_one(study, trial) == TrialState.FAIL else 0
                if failed >= max(MAX_FAILED_IN_A_ROW, settings.n_trials or 0):
                    warnings.warn(f"tune: {failed} trials in a row failed in this worker; stopping.", stacklevel=2)
                    break
            bar.n = sum(t.state in _FINISHED for t in study.get_trials(deepcopy=False))
            bar.refresh()
        finally:
            bar.close()

    def _run_one(self, study: optuna.Study, trial: optuna.Trial) -> TrialState:
        """Fit one trial and tell the study how it ended."""
        settings = self.settings
        values = {param.key: param.suggest(trial) for param in settings.params}
        run_dir = os.path.join(self.study_dir, f"trial_{trial.number}")
        trial.set_user_attr("run_dir", run_dir)
        try:
            with self._heartbeat(trial):
                if self.processes > 1:
                    result = run_ddp_trial(self.base, values, run_dir, trial, settings.monitor, self.processes)
                else:
                    result = run_trial(self.base, values, run_dir, [TrialPruning(trial, settings.monitor)])
        except (LitBigModelError, KeyboardInterrupt) as err:
            trial.set_user_attr("error", _one_line(err))
            study.tell(trial, state=TrialState.FAIL)
            raise
        except Exception as err:  # out of memory, NaN guards, bugs: this trial fails, the study goes on
            trial.set_user_attr("error", _one_line(err))
            study.tell(trial, state=TrialState.FAIL)
            _free_memory()
            return TrialState.FAIL
        trial.set_user_attr("global_step", result.global_step)
        trial.set_user_attr("metrics", result.metrics)
        if result.pruned:
            study.tell(trial, state=TrialState.PRUNED)
            return TrialState.PRUNED
        if not math.isfinite(result.value):
            trial.set_user_attr("error", f"`monitor` {settings.monitor!r} is {result.value}")
            study.tell(trial, state=TrialState.FAIL)
            return TrialState.FAIL
        study.tell(trial, result.value)
        return TrialState.COMPLETE

    @contextmanager
    def _heartbeat(self, trial: optuna.Trial) -> Iterator[None]:
        """Record the trial's heartbeat every `HEARTBEAT_S` seconds (URL storages)."""
        if self.heartbeat is None:
            yield
            return
        storage, trial_id, stop = self.heartbeat, _trial_id(trial), threading.Event()

        def beat() -> None:
            while not stop.is_set():
                storage.record_heartbeat(trial_id)
                stop.wait(HEARTBEAT_S)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def _trial_id(trial: optuna.Trial) -> int:
    """The storage id of a trial (Optuna keeps it private; `RDBStorage.record_heartbeat` takes it)."""
    return int(trial._trial_id)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {' '.join(str(err).split())}"[:500]
