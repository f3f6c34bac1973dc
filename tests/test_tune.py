"""`lit-bigmodel tune`: search-space checks, trials, pruning, failures, crash resume, several workers."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from lit_bigmodel.cli import tune_main
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.tuning import tune

ROOT = Path(__file__).resolve().parents[1]
LR = "model.init_args.learning_rate"


def _config(tmp_path: Path, max_steps: int = 10, val_every: int = 5) -> dict[str, Any]:
    config = yaml.safe_load((ROOT / "configs" / "sft_tiny.yaml").read_text())
    config["trainer"].update(
        accelerator="cpu", max_steps=max_steps, val_check_interval=val_every, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=5,
    )  # fmt: skip
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path / "runs")
    config["model"]["init_args"]["model"]["init_args"].update(n_layer=2, n_embd=32, n_head=2)
    config["data"]["init_args"].update(max_operand=20, num_val=32, num_test=8, batch_size=32)
    config.update(test_after_fit=False, export_dir=None)
    return config


def _search(**entries: Any) -> dict[str, Any]:
    search: dict[str, Any] = {
        "monitor": "val/loss", "n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0,
        "params": {LR: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
    }  # fmt: skip
    search.update(entries)
    return search


def _counts(study: optuna.Study) -> dict[str, int]:
    return {state.name: len(study.get_trials(states=(state,))) for state in TrialState}


# ---------------------------------------------------------------------------------------------- bad input
BAD = [
    ({"params": {"model.init_args.no_such_key": {"type": "float", "low": 0.1, "high": 1}}}, "has no key"),
    ({"params": {LR: {"type": "float", "low": 0.1, "high": 0.01}}}, "low must be <= high"),
    ({"params": {LR: {"type": "float", "low": 0.0, "high": 0.01, "log": True}}}, "log=true needs low > 0"),
    ({"params": {"data.init_args.batch_size": {"type": "categorical", "choices": []}}}, "non-empty list"),
    ({"sampler": "grid"}, "the `grid` sampler needs a `step`"),
    ({"sampler": "annealing"}, "`sampler` must be one of grid, random, tpe, gp, cmaes, nsga2, got 'annealing'"),
    ({"pruner": "patient"}, "`pruner` must be one of median, asha, hyperband, none, got 'patient'"),
    ({"pruner": {"name": "median", "n_startup": 1}}, "takes no argument(s) n_startup"),
    ({"params": {LR: {"type": "float", "low": float("nan"), "high": 1.0}}}, "must be a finite number"),
    ({"enqueue": [{LR: 1.0}]}, "`enqueue` value 1.0 of model.init_args.learning_rate is outside its search space"),
    ({"direction": "down"}, "`direction` must be one of minimize, maximize, got 'down'"),
]


@pytest.mark.parametrize(("entries", "message"), BAD, ids=[message[:24] for _, message in BAD])
def test_bad_search_fails_before_the_first_trial(tmp_path, entries, message):
    with pytest.raises(ConfigurationError) as error:
        tune(_config(tmp_path), _search(**entries), study_dir=tmp_path / "study")
    assert message in str(error.value)
    assert not (tmp_path / "study").exists()


UNLAUNCHABLE = [
    ({"num_nodes": 2}, "`trainer.num_nodes` must be 1 for `lit-bigmodel tune`, got 2"),
    ({"strategy": "ddp_spawn"}, "`trainer.strategy` of a multi-device trial must start its processes with popen"),
    ({"devices": 0}, "`trainer.devices` must be 'auto', a count >= 1 or a list of device ids, got 0"),
]


@pytest.mark.parametrize(("trainer", "message"), UNLAUNCHABLE, ids=["num_nodes", "ddp_spawn", "devices"])
def test_trials_tune_cannot_launch_are_refused_before_the_first_trial(tmp_path, trainer, message):
    config = _config(tmp_path)
    config["trainer"].update({"devices": 2, "strategy": "ddp", **trainer})
    with pytest.raises(ConfigurationError) as error:
        tune(config, _search(), study_dir=tmp_path / "study")
    assert message in str(error.value)
    assert not (tmp_path / "study").exists()


@pytest.mark.parametrize(
    ("devices", "accelerator", "processes"),
    [(1, "cpu", 1), (2, "cpu", 2), ("2", "cpu", 2), ("auto", "cpu", 1), ([0, 1], "gpu", 2), ("0,1", "gpu", 2)],
)
def test_trial_processes_follow_trainer_devices(tmp_path, devices, accelerator, processes):
    from lit_bigmodel.tuning.trial import BaseConfig

    config = _config(tmp_path)
    config["trainer"].update(devices=devices, accelerator=accelerator, strategy="ddp")
    assert BaseConfig.load(config).processes() == processes


def test_every_problem_is_named_at_once(tmp_path):
    params = {LR: {"type": "float", "low": 1.0, "high": 0.5}, "trainer.nope": {"type": "int", "low": 1, "high": 2}}
    with pytest.raises(ConfigurationError) as error:
        tune(_config(tmp_path), _search(params=params, sampler="x"), study_dir=tmp_path / "study")
    assert "low must be <= high" in str(error.value) and "'trainer.nope'" in str(error.value)
    assert "`sampler` must be one of" in str(error.value)


def test_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    config, search = tmp_path / "run.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path)))
    search.write_text(yaml.safe_dump(_search(pruner="patient")))
    with pytest.raises(SystemExit) as exit_info:
        tune_main(["-c", str(config), "--search", str(search), "--study_dir", str(tmp_path / "study")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-bigmodel: error:") and "'patient'" in err and "\n" not in err
    assert not (tmp_path / "study").exists()
    with pytest.raises(SystemExit):
        tune_main(["-c", str(config), "--search", str(tmp_path / "missing.yaml")])
    assert "missing.yaml' does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- studies
def test_a_grid_study_visits_every_point_once_although_each_trial_gets_a_new_sampler():
    """Optuna's grid sampler records each trial's point as a position in its seeded shuffle of the grid."""
    from lit_bigmodel.tuning.settings import parse_settings

    params = {
        LR: {"type": "float", "low": 0.01, "high": 0.03, "step": 0.01},
        "model.init_args.weight_decay": {"type": "float", "low": 0.0, "high": 0.1, "step": 0.1},
    }
    settings = parse_settings({"monitor": "val/loss", "sampler": "grid", "seed": 0, "params": params})
    study = optuna.create_study()
    for number in range(6):  # as the tune loop does: a sampler made anew before each trial
        study.sampler = settings.make_sampler(number)
        trial = study.ask()
        point = tuple(
            trial.suggest_float(key, spec["low"], spec["high"], step=spec["step"]) for key, spec in params.items()
        )
        study.tell(trial, 0.0)
        assert point not in [tuple(t.params.values()) for t in study.trials[:-1]], f"trial {number} repeats {point}"
    assert len({tuple(t.params.values()) for t in study.trials}) == 6


def test_study_writes_best_yaml_that_reproduces_its_metric(tmp_path, capsys):
    from lit_bigmodel.cli import run_cli

    study = tune(_config(tmp_path), _search(n_trials=3, sampler="tpe"), study_dir=tmp_path / "study")
    assert _counts(study)["COMPLETE"] == 3
    assert [t.user_attrs["global_step"] for t in study.trials] == [10, 10, 10]
    assert all((tmp_path / "study" / f"trial_{n}").is_dir() for n in range(3))
    for picture in ("history.png", "parallel_coordinate.png", "importances.png"):
        assert (tmp_path / "study" / picture).stat().st_size > 1000
    out = capsys.readouterr().out
    assert "3 complete, 0 pruned, 0 fail" in out and "learning_rate" in out
    best = tmp_path / "study" / "best.yaml"
    assert yaml.safe_load(best.read_text())["model"]["init_args"]["learning_rate"] == study.best_params[LR]
    rerun = ["fit", "-c", str(best), "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "rerun")]
    cli = run_cli(rerun)
    assert float(cli.trainer.callback_metrics["val/loss"]) == pytest.approx(study.best_value, rel=1e-5)


def test_pruned_trial_stops_training_early(tmp_path):
    search = _search(
        n_trials=2, pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        enqueue=[{LR: 1e-2}, {LR: 1e-7}], params={LR: {"type": "float", "low": 1e-8, "high": 1e-2, "log": True}},
    )  # fmt: skip
    study = tune(_config(tmp_path, max_steps=20, val_every=5), search, study_dir=tmp_path / "study", outputs=False)
    first, second = study.trials
    assert (first.state, first.user_attrs["global_step"]) == (TrialState.COMPLETE, 20)
    assert (second.state, second.user_attrs["global_step"]) == (TrialState.PRUNED, 5)
    assert list(second.intermediate_values) == [5]


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path):
    heads = "model.init_args.model.init_args.n_head"
    search = _search(
        n_trials=1, params={heads: {"type": "categorical", "choices": [2, 3]}, **_search()["params"]},
        enqueue=[{heads: 3, LR: 1e-3}, {heads: 2, LR: 1e-3}],
    )  # fmt: skip
    study = tune(_config(tmp_path), search, study_dir=tmp_path / "study", outputs=False)
    failed, complete = study.trials
    assert failed.state == TrialState.FAIL and "ValueError" in failed.user_attrs["error"]
    assert complete.state == TrialState.COMPLETE and _counts(study)["COMPLETE"] == 1


def test_monitor_never_logged_fails_the_study_after_the_first_trial(tmp_path):
    with pytest.raises(ConfigurationError) as error:
        tune(_config(tmp_path), _search(monitor="val/accuracy"), study_dir=tmp_path / "study", outputs=False)
    assert "'val/accuracy' was never logged" in str(error.value) and "val/loss" in str(error.value)
    study = optuna.load_study(study_name="study", storage=_journal(tmp_path / "study"))
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_a_changed_search_cannot_join_an_existing_study(tmp_path):
    tune(_config(tmp_path), _search(n_trials=1), study_dir=tmp_path / "study", outputs=False)
    other = _search(params={LR: {"type": "float", "low": 1e-3, "high": 1e-2}})
    with pytest.raises(ConfigurationError, match="already exists with another search"):
        tune(_config(tmp_path), other, study_dir=tmp_path / "study", outputs=False)


# ---------------------------------------------------------------------------------------------- modules
def _seqgan_config(tmp_path: Path, **model: Any) -> dict[str, Any]:
    """SeqGAN on a random 5000-token oracle, 6 loader batches an epoch, no validation loop."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
        },
        "model": {
            "class_path": "lit_bigmodel.SeqGANModule",
            "init_args": {
                "generator": {"class_path": "lit_bigmodel.nets.LSTMGenerator", "init_args": {
                    "vocab_size": 5000, "embedding_dim": 8, "hidden_dim": 8, "seq_len": 6}},
                "discriminator": {"class_path": "lit_bigmodel.nets.CNNDiscriminator", "init_args": {
                    "vocab_size": 5000, "embedding_dim": 8, "filter_sizes": [1, 2], "num_filters": [4, 4]}},
                "mle_epochs": 4, "d_pretrain_rounds": 0, "adv_epochs": 0, "nll_samples": 64, "eval_every": 1,
                **model,
            },
        },
        "data": {"class_path": "lit_bigmodel.datamodules.OracleDataModule", "init_args": {
            "oracle": "random", "num_sequences": 48, "seq_len": 6, "batch_size": 8}},
    }  # fmt: skip


class _AskedTrial:
    """An Optuna trial stand-in: records each report; its pruner says yes from the ``prune_at``-th question on."""

    def __init__(self, prune_at: int) -> None:
        self.prune_at, self.reports = prune_at, []

    def report(self, value: float, step: int) -> None:
        self.reports.append((step, value))

    def should_prune(self) -> bool:
        return len(self.reports) >= self.prune_at


def test_trial_pruning_asks_at_training_epoch_ends_without_a_validation_loop(tmp_path):
    from lit_bigmodel.tuning.pruning import TrialPruning
    from lit_bigmodel.tuning.trial import BaseConfig, run_trial

    trial = _AskedTrial(prune_at=2)
    pruning = TrialPruning(trial, "nll_oracle")
    base = BaseConfig.load(_seqgan_config(tmp_path, eval_every=2))
    result = run_trial(base, {}, str(tmp_path / "run"), [pruning])
    # 6 MLE steps an epoch; nll_oracle is logged at the ends of epochs 2 and 4 (the end of epoch 1 asks nothing)
    assert [step for step, _ in trial.reports] == [12, 24]
    assert (result.pruned, result.global_step, pruning.pruned_at_step) == (True, 24, 24)
    assert trial.reports[-1][1] == pytest.approx(result.value)


def test_seqgan_study_optimizes_its_nll_oracle(tmp_path):
    search = {
        "monitor": "nll_oracle", "n_trials": 2, "sampler": "random", "pruner": "none", "seed": 0,
        "params": {"model.init_args.g_lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True}},
    }  # fmt: skip
    study = tune(_seqgan_config(tmp_path, mle_epochs=2), search, study_dir=tmp_path / "study", outputs=False)
    assert _counts(study)["COMPLETE"] == 2
    for trial in study.trials:
        assert list(trial.intermediate_values) == [6, 12]  # one report at each training epoch end
        assert trial.value == pytest.approx(trial.intermediate_values[12]) and trial.user_attrs["global_step"] == 12


def test_distillation_study_with_a_saved_teacher(tmp_path):
    from lit_bigmodel import SFTModule
    from lit_bigmodel.datamodules import ArithmeticDataModule

    teacher = SFTModule(_tiny_gpt2())
    teacher.tokenizer = ArithmeticDataModule(max_operand=20, num_val=32, num_test=8).tokenizer
    teacher.configure_model()
    teacher.export(tmp_path / "teacher")
    config = _config(tmp_path)
    student = config["model"]["init_args"]["model"]
    config["model"] = {
        "class_path": "lit_bigmodel.DistillationModule",
        "init_args": {"student": student, "teacher": str(tmp_path / "teacher"), "learning_rate": 2e-3},
    }
    search = _search(params={
        LR: {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "model.init_args.alpha": {"type": "categorical", "choices": [0.0, 0.5]},
    })  # fmt: skip
    study = tune(config, search, study_dir=tmp_path / "study", outputs=False)
    assert _counts(study)["COMPLETE"] == 2
    assert [t.user_attrs["global_step"] for t in study.trials] == [10, 10]
    assert all(math.isfinite(t.value) for t in study.trials)


def _tiny_gpt2(**overrides: Any) -> Any:
    from transformers import GPT2Config

    settings = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 32, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0, **overrides}  # fmt: skip
    return GPT2Config(**settings)


@pytest.mark.parametrize(
    ("config", "search"),
    [("sft_tiny.yaml", "tune_sft_tiny.yaml"), ("seqgan_oracle_smoke.yaml", "tune_seqgan_oracle_smoke.yaml")],
)
def test_shipped_search_files_fit_their_configs(config, search):
    from lit_bigmodel.tuning import parse_settings
    from lit_bigmodel.tuning.trial import BaseConfig

    base = BaseConfig.load(ROOT / "configs" / config)
    settings = parse_settings(yaml.safe_load((ROOT / "configs" / search).read_text()), has_key=base.has_key)
    assert settings.params and base.processes() == 1


# ---------------------------------------------------------------------------------------------- processes
def _journal(study_dir: Path) -> optuna.storages.BaseStorage:
    backend = optuna.storages.journal.JournalFileBackend(str(study_dir / "journal.log"))
    return optuna.storages.JournalStorage(backend)


def _command(tmp_path: Path, study_dir: Path, *extra: str, **search: Any) -> list[str]:
    config, space = tmp_path / "run.yaml", tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(_config(tmp_path, max_steps=30, val_every=10)))
    space.write_text(yaml.safe_dump(_search(**search)))
    return [sys.executable, "-m", "lit_bigmodel.cli", "tune", "-c", str(config), "--search", str(space),
            "--study_dir", str(study_dir), *extra]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _assert_exactly(study: optuna.Study, n_trials: int) -> None:
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == n_trials
    assert len({t.number for t in study.trials}) == len(study.trials)
    assert len({t.params[LR] for t in complete}) == n_trials  # no trial ran twice
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))


@pytest.mark.multiprocess
def test_killed_study_resumes_to_exactly_n_trials(tmp_path):
    study_dir = tmp_path / "study"
    command = _command(tmp_path, study_dir, n_trials=3)
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if (study_dir / "journal.log").exists():
            trials = optuna.load_study(study_name="study", storage=_journal(study_dir)).trials
            if len(trials) == 2 and trials[1].state == TrialState.RUNNING and (study_dir / "trial_1").exists():
                break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed = optuna.load_study(study_name="study", storage=_journal(study_dir))
    assert [t.state for t in killed.trials] == [TrialState.COMPLETE, TrialState.RUNNING]

    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="study", storage=_journal(study_dir))
    _assert_exactly(study, 3)
    assert study.trials[1].state == TrialState.FAIL
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 1)
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[1].params


def _run_two_workers(tmp_path: Path, *extra: str) -> list[subprocess.CompletedProcess[str]]:
    command = _command(tmp_path, tmp_path / "study", *extra, n_trials=4)
    workers = [subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        worker.wait(timeout=600)
    return [subprocess.CompletedProcess(w.args, w.returncode, None, w.stderr.read()) for w in workers]  # type: ignore[union-attr]


@pytest.mark.multiprocess
def test_two_workers_share_the_embedded_storage(tmp_path):
    for done in _run_two_workers(tmp_path):
        assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="study", storage=_journal(tmp_path / "study"))
    _assert_exactly(study, 4)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2  # both took part


@pytest.fixture
def postgres_url():
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not on PATH")
    pytest.importorskip("psycopg2")
    home = tempfile.mkdtemp(prefix="tune_pg_")
    run_as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []  # initdb refuses to run as root
    if run_as:
        shutil.chown(home, "nobody")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = os.path.join(home, "data")
    subprocess.run([*run_as, "initdb", "-D", data, "-U", "postgres", "--auth=trust"], check=True, capture_output=True)
    options = f"-p {port} -k {home} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*run_as, "pg_ctl", "-D", data, "-o", options, "-l", os.path.join(home, "log"), "-w", "start"],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, "pg_ctl", "-D", data, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.multiprocess
def test_two_workers_finish_one_postgresql_study(tmp_path, postgres_url):
    for done in _run_two_workers(tmp_path, "--storage", postgres_url, "--study_name", "shared"):
        assert done.returncode == 0, done.stderr[-3000:]
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    _assert_exactly(study, 4)
    assert not study.get_trials(states=(TrialState.FAIL,))


# ---------------------------------------------------------------------------------------------- DDP trials
def _ranks(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((run_dir / f"rank_{rank}.json").read_text()) for rank in (0, 1)]


def _ddp_config(tmp_path: Path, **trainer: Any) -> dict[str, Any]:
    config = _config(tmp_path, max_steps=20, val_every=5)
    config["trainer"].update(devices=2, strategy="ddp", **trainer)
    return config


@pytest.mark.multiprocess
def test_ddp_study_completes_and_a_pruned_trial_stops_every_rank_at_one_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    search = _search(
        n_trials=2, pruner={"name": "median", "n_startup_trials": 1, "n_warmup_steps": 0},
        enqueue=[{LR: 1e-2}, {LR: 1e-7}], params={LR: {"type": "float", "low": 1e-8, "high": 1e-2, "log": True}},
    )  # fmt: skip
    study = tune(_ddp_config(tmp_path), search, study_dir=tmp_path / "study", outputs=False)
    first, second = study.trials
    assert (first.state, first.user_attrs["global_step"]) == (TrialState.COMPLETE, 20)
    assert [r["global_step"] for r in _ranks(tmp_path / "study" / "trial_0")] == [20, 20]
    assert (second.state, second.user_attrs["global_step"]) == (TrialState.PRUNED, 5)
    ranks = _ranks(tmp_path / "study" / "trial_1")
    assert [(r["global_step"], r["pruned_at_step"]) for r in ranks] == [(5, 5), (5, 5)]
    assert list(second.intermediate_values) == [5]  # reported once, by rank zero through the worker


_CRASH = """
import os
from lightning.pytorch import Callback


class CrashRank(Callback):
    def __init__(self, rank: int, step: int, trial_dir: str) -> None:
        self.rank, self.step, self.trial_dir = rank, step, trial_dir

    def on_train_batch_end(self, trainer, *args):
        here = os.path.basename(trainer.default_root_dir) == self.trial_dir
        if here and trainer.global_rank == self.rank and trainer.global_step == self.step:
            os._exit(3)  # as a rank killed mid-step: rank 0 is left in the next all-reduce
"""


@pytest.mark.multiprocess
def test_a_failed_rank_fails_its_ddp_trial_and_the_study_goes_on(tmp_path, monkeypatch):
    (tmp_path / "crash_rank.py").write_text(_CRASH)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), str(ROOT)]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    crash = {"class_path": "crash_rank.CrashRank", "init_args": {"rank": 1, "step": 3, "trial_dir": "trial_0"}}
    config = _ddp_config(tmp_path, max_steps=10, callbacks=[crash])
    started = time.monotonic()
    study = tune(config, _search(n_trials=1), study_dir=tmp_path / "study", outputs=False)
    assert time.monotonic() - started < 240  # nobody waited for the dead rank
    failed, complete = study.trials
    assert failed.state == TrialState.FAIL and "rank 1 exited with 3" in failed.user_attrs["error"]
    assert "rank_1.log" in failed.user_attrs["error"]
    assert complete.state == TrialState.COMPLETE and complete.user_attrs["global_step"] == 10


@pytest.mark.multiprocess
def test_an_input_error_of_a_ddp_trial_stops_the_study(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = _ddp_config(tmp_path, max_steps=5)
    with pytest.raises(ConfigurationError) as error:
        tune(config, _search(monitor="val/accuracy"), study_dir=tmp_path / "study", outputs=False)
    assert "'val/accuracy' was never logged" in str(error.value) and "val/loss" in str(error.value)
    study = optuna.load_study(study_name="study", storage=_journal(tmp_path / "study"))
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_wandb_trials_are_named_after_the_trial_and_grouped_by_study(tmp_path):
    from lit_bigmodel.tuning.trial import BaseConfig, point_logger_at_trial

    config = _config(tmp_path)
    config["trainer"]["logger"] = {
        "class_path": "lightning.pytorch.loggers.WandbLogger",
        "init_args": {"project": "p", "offline": True},
    }
    namespace = BaseConfig.load(config).with_values({})
    point_logger_at_trial(namespace, str(tmp_path / "study_a" / "trial_4"))
    init_args = namespace["trainer.logger"].init_args
    assert (init_args.group, init_args.name) == ("study_a", "trial_4")
    assert init_args.save_dir == str(tmp_path / "study_a" / "trial_4")
