"""Every class of bad input to `lit-bigmodel`: one line naming the value, exit status 2, output folders unchanged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_bigmodel.cli import run_cli

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sft_tiny.yaml")
TINY_MODEL = [
    "--model.init_args.model.init_args.n_layer", "1", "--model.init_args.model.init_args.n_embd", "32",
    "--model.init_args.model.init_args.n_head", "2",
]  # fmt: skip


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def _args(tmp_path: Path, *extra: str, tiny: bool = True) -> list[str]:
    out = tmp_path / "out"
    return [
        "fit", "-c", CONFIG, *(TINY_MODEL if tiny else []),
        "--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(out), "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--data.init_args.num_val", "8", "--data.init_args.num_test", "8",
        "--export_dir", str(out / "model"), *extra,
    ]  # fmt: skip


def _instruction_args(tmp_path: Path, tokenizer: Path, **files: str) -> list[str]:
    data = ["--data", "lit_bigmodel.datamodules.InstructionDataModule", "--data.init_args.tokenizer", str(tokenizer),
            "--data.init_args.cache_dir", str(tmp_path / "out" / "cache"), "--data.init_args.batch_size", "2"]  # fmt: skip
    for name, value in files.items():
        data += [f"--data.init_args.{name}", value]
    args = _args(tmp_path, *data)
    for key in ("--data.init_args.num_val", "--data.init_args.num_test"):  # arithmetic-only arguments
        i = args.index(key)
        del args[i : i + 2]
    return args


def _fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], *named: str) -> str:
    """Run the CLI; assert status 2, one error line naming ``named``, and nothing changed under ``out``."""
    out = tmp_path / "out"
    before = _listing(out)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("lit-bigmodel")]
    assert len(lines) == 1, err[-3000:]
    assert "usage:" not in err, err[-3000:]
    for word in named:
        assert word in lines[0], lines[0]
    print(lines[0], file=sys.__stdout__)
    assert _listing(out) == before
    return lines[0]


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lit-bigmodel"])  # the CLI reads `args`, not pytest's own arguments


@pytest.fixture
def tokenizer_dir(tmp_path: Path, char_tokenizer) -> Path:
    path = tmp_path / "inputs" / "tokenizer"
    char_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def train_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "inputs" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": str(i + 1)}) + "\n" for i in range(10)))
    return path


# ---------------------------------------------------------------------------------------------- the parser
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--no_such_key", "1"], "no_such_key"),
        (["--trainer.max_steps", "many"], "many"),
        (["--model.init_args.learning_rate", "fast"], "fast"),
    ],
    ids=["unknown-key", "wrong-type-trainer", "wrong-type-model"],
)
def test_parser_errors_are_one_line_with_a_help_hint(tmp_path, capsys, extra, named):
    line = _fails_cleanly(tmp_path, capsys, _args(tmp_path, *extra), named)
    assert "--help" in line


def test_malformed_yaml_is_one_line(tmp_path, capsys):
    config = tmp_path / "inputs" / "bad.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("trainer: [max_steps: 1\n")
    _fails_cleanly(tmp_path, capsys, ["fit", "-c", str(config)], "bad.yaml")


def test_parser_error_in_a_subprocess_prints_exactly_one_line(tmp_path):
    code = "import sys; from lit_bigmodel.cli import main; sys.argv = sys.argv[1:]; main()"
    argv = ["lit-bigmodel", "fit", "-c", CONFIG, "--trainer.max_steps", "many"]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--trainer.max_steps", "-5"], "-5"),
        (["--trainer.val_check_interval", "-3"], "-3"),
        (["--model.init_args.warmup_steps", ".nan"], "nan"),
        (["--model.init_args.learning_rate", "-1"], "learning_rate"),
    ],
    ids=["trainer-max_steps", "trainer-val_check_interval", "module-nan", "module-negative"],
)
def test_invalid_argument_values(tmp_path, capsys, extra, named):
    _fails_cleanly(tmp_path, capsys, _args(tmp_path, *extra), named)


# ---------------------------------------------------------------------------------------------- checkpoints
def _tiny_module_state(n_embd: int) -> dict[str, torch.Tensor]:
    from transformers import GPT2Config

    from lit_bigmodel import SFTModule

    module = SFTModule(GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, n_positions=32))
    module.configure_model()
    return module.state_dict()


@pytest.mark.parametrize("kind", ["missing", "text", "directory", "truncated", "no-state-dict", "other-shape"])
def test_bad_checkpoints(tmp_path, capsys, kind):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = inputs / "model.ckpt"
    if kind == "text":
        path.write_text("hello, not a checkpoint\n")
    elif kind == "directory":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    elif kind == "truncated":
        torch.save({"state_dict": _tiny_module_state(32)}, path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no-state-dict":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "other-shape":
        torch.save({"state_dict": _tiny_module_state(64), "pytorch-lightning_version": "2.6.0"}, path)
    _fails_cleanly(tmp_path, capsys, _args(tmp_path, "--ckpt_path", str(path)), "--ckpt_path", "model.ckpt")


# ---------------------------------------------------------------------------------------------- outputs
def test_export_dir_that_is_a_file(tmp_path, capsys):
    export = tmp_path / "out" / "model"
    export.parent.mkdir()
    export.write_text("a file")
    _fails_cleanly(tmp_path, capsys, _args(tmp_path), "--export_dir", "file")


def test_non_empty_export_dir_without_overwrite(tmp_path, capsys):
    export = tmp_path / "out" / "model"
    export.mkdir(parents=True)
    (export / "keep").write_text("x")
    _fails_cleanly(tmp_path, capsys, _args(tmp_path, "--export_overwrite", "false"), "--export_overwrite")


def test_export_refuses_non_finite_weights(tmp_path, tiny_gpt2_config):
    from transformers import AutoModelForCausalLM

    from lit_bigmodel.errors import ConfigurationError
    from lit_bigmodel.export import write_pretrained

    network = AutoModelForCausalLM.from_config(tiny_gpt2_config)
    with torch.no_grad():
        network.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(ConfigurationError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight"):
        write_pretrained(str(tmp_path / "model"), network)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize("split", ["train_file", "val_file", "test_file"])
def test_missing_data_file(tmp_path, capsys, tokenizer_dir, train_jsonl, split):
    files = {"train_file": str(train_jsonl), split: str(tmp_path / "inputs" / "absent.jsonl")}
    args = _instruction_args(tmp_path, tokenizer_dir, **files)
    _fails_cleanly(tmp_path, capsys, args, "absent.jsonl")


def test_malformed_data_line(tmp_path, capsys, tokenizer_dir, train_jsonl):
    bad = tmp_path / "inputs" / "val.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": oops\n')
    args = _instruction_args(tmp_path, tokenizer_dir, train_file=str(train_jsonl), val_file=str(bad))
    _fails_cleanly(tmp_path, capsys, args, "val.jsonl", "line 2")


def test_test_after_fit_without_test_data(tmp_path, capsys, tokenizer_dir, train_jsonl):
    args = _instruction_args(tmp_path, tokenizer_dir, train_file=str(train_jsonl))
    _fails_cleanly(tmp_path, capsys, [*args, "--test_after_fit", "true"], "--test_after_fit", "test_file")


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("kind", ["missing", "corrupt-config", "not-a-model"])
def test_bad_model_directory(tmp_path, capsys, kind):
    model_dir = tmp_path / "inputs" / "pretrained"
    if kind != "missing":
        model_dir.mkdir(parents=True)
        (model_dir / ("config.json" if kind == "corrupt-config" else "README.md")).write_text("{not json")
    args = _args(tmp_path, "--model.init_args.model", str(model_dir), tiny=False)
    _fails_cleanly(tmp_path, capsys, args, "pretrained")


# ---------------------------------------------------------------------------------------------- callbacks
@pytest.mark.parametrize(
    "kwargs",
    [
        {"check_every_n_steps": float("inf")},
        {"check_every_n_steps": float("nan")},
        {"log_every_n_steps": float("inf")},
        {"log_every_n_steps": "10"},
    ],
)
def test_precision_monitor_rejects_non_finite_and_non_integer_intervals(kwargs):
    from lit_bigmodel.callbacks import PrecisionMonitor
    from lit_bigmodel.errors import ConfigurationError

    (name,) = kwargs
    with pytest.raises(ConfigurationError, match=f"`{name}` must be an integer >= 1"):
        PrecisionMonitor(**kwargs)
