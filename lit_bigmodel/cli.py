"""`lit-bigmodel`: the LightningCLI of the library (fit / validate / test / predict with YAML configs).

Beyond Lightning's own arguments, ``fit`` takes ``--test_after_fit true`` (run the test split
on the trained model and print its metrics) and ``--export_dir DIR`` (write a ``save_pretrained``
directory at the end; ``--export_overwrite true`` to replace a non-empty one). ``lit-bigmodel export
CKPT OUT`` exports a checkpoint offline (any strategy's checkpoint, sharded ones included).
``lit-bigmodel tune -c CONFIG --search SPACE`` runs an Optuna study over the keys of a fit config
(`lit_bigmodel.tuning`).

Bad input (an unknown key, a value of the wrong type, a missing or unreadable file, a checkpoint that
does not fit the model, an export directory in the way) ends the run with one line on stderr naming
the value and exit status 2. Inputs are checked before the first file is written; an input error
found later, before the first optimizer step, removes what this run wrote (logger version folder,
``config.yaml``, new cache files).

Example::

    lit-bigmodel fit -c configs/sft_tiny.yaml
    lit-bigmodel fit -c configs/sft_tiny.yaml --trainer.max_steps 200 --export_dir out/model
    lit-bigmodel tune -c configs/sft_tiny.yaml --search configs/tune_sft_tiny.yaml --n_trials 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import sys
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_bigmodel.errors import ConfigurationError, LitBigModelError, MissingPathError

_SPECIAL_CKPT = ("last", "best", "hpc", "registry")  # names Lightning resolves itself, not paths


class OneLineArgumentParser(LightningArgumentParser):
    """LightningCLI's parser whose errors are one line (the message and a ``--help`` hint), exit status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        words = self.prog.replace(" [options]", "").split()
        command = " ".join(["lit-bigmodel", *words[1:2]])
        print(f"lit-bigmodel: error: {_parser_message(message)} (see `{command} --help`)", file=sys.stderr)
        sys.exit(2)


def _parser_message(message: str) -> str:
    """jsonargparse's (often nested, many-line) message as one line that starts with the flag.

    ``Parser key "model": ... Problem with given class_path 'X': Parser key "lr": Expected ...`` becomes
    ``--model.init_args.lr: Expected ... (X)``.
    """
    outer = re.match(r'Parser key "([^"]+)":', message)
    nested = re.search(r"Problem with given class_path '([^']+)':\s*\n(.*?)(?:\n\s*- |\Z)", message, re.S)
    if outer and nested:
        inner = _one_line(nested.group(2))
        key = re.match(r'Parser key "([^"]+)":\s*(.*)', inner)
        flag = f"--{outer.group(1)}.init_args" + (f".{key.group(1)}" if key else "")
        return f"{flag}: {key.group(2) if key else inner} ({nested.group(1)})"
    if outer:
        return f"--{outer.group(1)}: {_one_line(message[outer.end() :])}"
    return _one_line(message)


class LitBigModelCLI(LightningCLI):
    """LightningCLI with a test-after-fit step, an export step and one-line errors for bad input.

    Right after parsing, each ``--config`` file must be valid YAML and ``--ckpt_path`` must be a
    checkpoint (exists, loads, holds a ``state_dict``; or a DeepSpeed / FSDP checkpoint directory).

    Before ``trainer.fit`` / ``validate`` / ``test`` / ``predict`` (``before_<subcommand>``), every input is
    checked without writing anything: the export directory, the datamodule's files (its ``validate_inputs()`` when it has one), the test data
    for ``--test_after_fit``, and local model directories. Trainer arguments Lightning rejects are
    reported the same way.

    Example::

        LitBigModelCLI(subclass_mode_model=True, subclass_mode_data=True, args=["fit", "-c", "configs/sft_tiny.yaml"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", OneLineArgumentParser)
        self._outputs: _NewOutputs | None = None
        self._ckpt_path: str | None = None
        try:
            super().__init__(*args, **kwargs)
        except Exception as err:
            cause = _user_error(err) or self._explain(err)
            if cause is None:
                raise
            trainer = getattr(self, "trainer", None)
            early = trainer is not None and trainer.global_step == 0 and trainer.is_global_zero
            if self._outputs is not None and early:  # nothing trained yet: what this run wrote is worth nothing
                self._outputs.remove()
            if cause is err:
                raise
            raise cause from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run the test split and print its metrics."
        )
        parser.add_argument(
            "--export_dir", type=str | None, default=None, help="After fit, export a save_pretrained directory here."
        )
        parser.add_argument("--export_overwrite", type=bool, default=False, help="Replace a non-empty --export_dir.")
        parser.add_argument(
            "--export_dequantize",
            type=bool,
            default=False,
            help="QLoRA: merge the adapters into the dequantized base for --export_dir (written in float32).",
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None or isinstance(args, list):
            _check_config_files(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path is not None and not (str(ckpt_path) in _SPECIAL_CKPT and not os.path.exists(ckpt_path)):
            from lit_bigmodel.export import read_checkpoint

            read_checkpoint(ckpt_path, argument="--ckpt_path")  # before Lightning reads its hyperparameters
            self._ckpt_path = os.fspath(ckpt_path)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            return super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as err:
            if isinstance(err, LitBigModelError):
                raise
            raise ConfigurationError(f"invalid --trainer argument: {_one_line(str(err))}") from err

    # ------------------------------------------------------------------ checks before the first write
    def before_fit(self) -> None:
        self._check_inputs("fit")

    def before_validate(self) -> None:
        self._check_inputs("validate")

    def before_test(self) -> None:
        self._check_inputs("test")

    def before_predict(self) -> None:
        self._check_inputs("predict")

    def _check_inputs(self, subcommand: str) -> None:
        """Raise one `LitBigModelError` listing every bad input of ``subcommand``; write nothing."""
        config = self.config[subcommand]
        problems: list[str] = []
        if subcommand == "fit":
            problems += _export_dir_problems(config.get("export_dir"), bool(config.get("export_overwrite")))
            if (
                config.get("export_dir")
                and getattr(self.model, "quantization", None) is not None
                and not config.get("export_dequantize")
            ):
                problems.append(
                    "--export_dir merges the adapters, and the base is quantized (`quantization`): add "
                    "--export_dequantize true (merge into the dequantized base, written in float32)."
                )
        problems += _model_problems(self.model)
        if self.datamodule is not None:
            try:
                _check_data(self.datamodule)
            except LitBigModelError as err:
                problems.append(str(err))
            if subcommand == "test" or (subcommand == "fit" and config.get("test_after_fit")):
                problems += _test_data_problems(self.datamodule, subcommand)
        if problems:
            raise ConfigurationError(" ".join(problems))
        self._outputs = _NewOutputs(self.trainer, self.datamodule)

    def _explain(self, err: BaseException) -> LitBigModelError | None:
        """A user-input error for what Lightning raised, or None for anything else."""
        chain = _chain(err)
        if self._ckpt_path is not None:
            for item in chain:
                if isinstance(item, RuntimeError) and "Error(s) in loading state_dict" in str(item):
                    detail = next((line.strip() for line in str(item).splitlines()[1:] if line.strip()), "")
                    return ConfigurationError(
                        f"--ckpt_path {self._ckpt_path!r} does not fit the model: {_one_line(detail)}"
                    )
        for item in chain:
            if isinstance(item, MisconfigurationException):
                return ConfigurationError(_one_line(str(item)))
        return None

    # ------------------------------------------------------------------ after fit
    def after_fit(self) -> None:
        config = self.config[self.subcommand]
        report = self.trainer.is_global_zero
        if config.get("test_after_fit"):
            results = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            if results and report:
                print("Held-out test metrics:")
                for name, value in sorted(results[0].items()):
                    print(f"  {name}: {value:.4f}")
                if "test/exact_match" in results[0]:
                    print(f"HELD-OUT EXACT MATCH: {100 * results[0]['test/exact_match']:.1f}%")
        if config.get("export_dir"):
            options = {"dequantize": True} if config.get("export_dequantize") else {}
            path = self.model.export(config["export_dir"], overwrite=bool(config.get("export_overwrite")), **options)
            if report:
                print(f"Exported the model to {path}")


class _NewOutputs:
    """What a run is about to write (logger version folders, ``config.yaml``, cache files), to remove on an input error.

    Recorded before ``trainer.<subcommand>``; `remove` deletes only paths that did not exist then, and puts
    back the bytes of a ``config.yaml`` that did.
    """

    def __init__(self, trainer: Trainer, datamodule: Any) -> None:
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        self.new_paths: list[str] = []
        self.old_files: dict[str, bytes] = {}
        self.cache_dir: str | None = None
        self.cache_listing: set[str] = set()
        folders = [trainer.default_root_dir]
        for logger in trainer.loggers:
            if isinstance(logger, (CSVLogger, TensorBoardLogger)):  # log_dir is computed without writing
                folders.append(logger.log_dir)
        for folder in folders:
            self._record_new(folder)
        first = trainer.loggers[0] if trainer.loggers else None
        config_dir = first.log_dir if isinstance(first, (CSVLogger, TensorBoardLogger)) else trainer.default_root_dir
        config_path = os.path.join(str(config_dir), "config.yaml")
        if os.path.isfile(config_path):
            with open(config_path, "rb") as handle:
                self.old_files[config_path] = handle.read()
        else:
            self._record_new(config_path)
        cache_dir = getattr(datamodule, "cache_dir", None)
        if isinstance(cache_dir, (str, os.PathLike)):
            self.cache_dir = os.fspath(cache_dir)
            if os.path.isdir(self.cache_dir):
                self.cache_listing = set(os.listdir(self.cache_dir))
            else:
                self._record_new(self.cache_dir)

    def _record_new(self, path: str | os.PathLike[str]) -> None:
        """Remember the outermost missing folder on the way to ``path`` (nothing if ``path`` exists)."""
        path = os.path.abspath(os.fspath(path))
        if os.path.exists(path):
            return
        while not os.path.exists(os.path.dirname(path)):
            path = os.path.dirname(path)
        self.new_paths.append(path)

    def remove(self) -> None:
        if self.cache_dir is not None and self.cache_listing and os.path.isdir(self.cache_dir):
            for name in set(os.listdir(self.cache_dir)) - self.cache_listing:
                _remove(os.path.join(self.cache_dir, name))
        for path in self.new_paths:
            _remove(path)
        for path, data in self.old_files.items():
            with open(path, "wb") as handle:
                handle.write(data)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _check_config_files(argv: list[str]) -> None:
    """Raise `ConfigurationError` for a ``-c`` / ``--config`` file that is missing or not valid YAML."""
    import yaml

    paths = [value for flag, value in itertools.pairwise(argv) if flag in ("-c", "--config")]
    paths += [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]
    for path in paths:
        if not os.path.isfile(path):
            raise MissingPathError(f"--config {path!r} does not exist.")
        try:
            with open(path, encoding="utf-8") as handle:
                yaml.safe_load(handle)
        except UnicodeDecodeError as err:
            raise ConfigurationError(f"--config {path!r} is not UTF-8 text ({err.reason}).") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err)
            raise ConfigurationError(f"--config {path!r} is not valid YAML: {problem}{where}.") from err


def _export_dir_problems(export_dir: str | None, overwrite: bool) -> list[str]:
    if not export_dir:
        return []
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        return [f"--export_dir {export_dir!r} is a file, not a directory; choose another --export_dir."]
    if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
        return [f"--export_dir {export_dir!r} exists and is not empty; add --export_overwrite true."]
    parent = os.path.dirname(os.path.abspath(export_dir))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return [f"--export_dir {export_dir!r} is inside {parent!r}, which is a file; choose another --export_dir."]
    return []


def _model_problems(module: Any) -> list[str]:
    """Local model directories the module will load (``model_source``, ``teacher_source``) that cannot be loaded."""
    from lit_bigmodel._paths import looks_like_local_path

    problems = []
    sources = {"model": getattr(module, "model_source", None), "teacher": getattr(module, "teacher_source", None)}
    if "teacher_source" in vars(module):
        sources = {"student": sources["model"], "teacher": sources["teacher"]}
    for argument, source in sources.items():
        if not isinstance(source, (str, os.PathLike)):
            continue
        name = os.fspath(source)
        flag = f"--model.init_args.{argument}"
        nested = re.fullmatch(r"NestedArg\(key='([^']*)', val='(.*)'\)", name, re.S)
        if nested:  # jsonargparse gives a rejected config field to the ``str`` branch of the union as its repr
            problems.append(f"{flag}.init_args.{nested.group(1)}: {nested.group(2)!r} is not accepted.")
            continue
        if not looks_like_local_path(name):
            continue  # a hub id: loaded (or refused) by transformers
        if not os.path.isdir(name):
            problems.append(f"{flag}: model directory {name!r} does not exist.")
            continue
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(name)
        except Exception as err:
            problems.append(f"{flag}: model directory {name!r} has no readable config.json ({_one_line(str(err))}).")
    return problems


def _check_data(datamodule: Any) -> None:
    """The datamodule's own side-effect-free check, or at least that every configured file exists."""
    validate = getattr(datamodule, "validate_inputs", None)
    if callable(validate):
        validate()
        return
    files = getattr(datamodule, "files", None)
    if isinstance(files, dict):
        for split, path in files.items():
            if isinstance(path, (str, os.PathLike)) and not os.path.isfile(path):
                raise MissingPathError(f"--data.init_args.{split}_file: data file {os.fspath(path)!r} does not exist.")


def _test_data_problems(datamodule: Any, subcommand: str) -> list[str]:
    """A file-based datamodule with no ``test_file``, where the test split will be needed."""
    from lit_bigmodel.datamodules import TokenizedDataModule

    files = getattr(datamodule, "files", None)
    reads_files = type(datamodule).load_records is TokenizedDataModule.load_records
    if (
        isinstance(datamodule, TokenizedDataModule)
        and reads_files
        and isinstance(files, dict)
        and not files.get("test")
    ):
        flag = "--test_after_fit true" if subcommand == "fit" else "`test`"
        return [f"{flag} needs test data: set --data.init_args.test_file (got none)."]
    return []


def _chain(err: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while err is not None and all(err is not item for item in seen):
        seen.append(err)
        err = err.__cause__ or err.__context__
    return seen


def _user_error(err: BaseException | None) -> LitBigModelError | None:
    """Our own input error behind ``err``: jsonargparse wraps errors raised while instantiating classes."""
    return next((item for item in _chain(err) if isinstance(item, LitBigModelError)), None)


def _one_line(message: str) -> str:
    return re.sub(r"\s*\n\s*", " ", message.strip())


def run_cli(args: list[str] | None = None) -> LitBigModelCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``) and return it; input errors exit with status 2."""
    try:
        return LitBigModelCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except Exception as err:
        _exit_on_user_error(err)
        raise


def _exit_on_user_error(err: Exception) -> None:
    """Print one line and exit with status 2 when ``err`` comes from bad input; return otherwise."""
    cause = _user_error(err)
    if cause is not None:
        print(f"lit-bigmodel: error: {_one_line(str(cause))}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """Entry point of the ``lit-bigmodel`` console script (returns nothing, so the exit status is 0).

    ``lit-bigmodel export CKPT OUT`` writes a ``save_pretrained`` directory from a checkpoint
    (`lit_bigmodel.export`); ``lit-bigmodel quantize MODEL_DIR OUT --scheme S`` quantizes a model
    directory with torchao (`lit_bigmodel.quantization.ptq`); ``lit-bigmodel tune`` runs a hyperparameter study (`tune_main`); every other
    subcommand is LightningCLI's.
    """
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from lit_bigmodel.export import main as export_main

        export_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "quantize":
        from lit_bigmodel.quantization.ptq import main as quantize_main

        quantize_main(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "tune":
        tune_main(sys.argv[2:])
        return
    run_cli()


class _OneLineParser(argparse.ArgumentParser):
    """argparse with lit-bigmodel's one-line errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"lit-bigmodel: error: {_one_line(message)} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def tune_main(argv: list[str]) -> None:
    """``lit-bigmodel tune -c CONFIG --search SPACE``: an Optuna study over a fit config (`lit_bigmodel.tuning`).

    The flags replace the entries of the search file. Input errors print one line and exit with status 2
    before anything is written.

    Example::

        lit-bigmodel tune -c configs/sft_tiny.yaml --search configs/tune_sft_tiny.yaml --n_trials 4 --seed 0
    """
    parser = _OneLineParser(prog="lit-bigmodel tune", description="Run an Optuna study over the keys of a fit config.")
    parser.add_argument("-c", "--config", required=True, help="A `lit-bigmodel fit` config file.")
    parser.add_argument("--search", required=True, help="The search file: params, monitor, direction, ...")
    parser.add_argument(
        "--study_dir", help="Trial folders, storage, best.yaml, pictures (default: runs/tune_<config>)."
    )
    parser.add_argument("--n_trials", type=int, help="Finished (complete or pruned) trials to reach.")
    parser.add_argument("--timeout", type=float, help="Seconds after which this worker starts no new trial.")
    parser.add_argument("--sampler", help="grid, random, tpe, gp, cmaes or nsga2.")
    parser.add_argument("--pruner", help="median, asha, hyperband or none.")
    parser.add_argument("--seed", type=int, help="Seeds the sampler.")
    parser.add_argument(
        "--storage", help="Optuna storage URL (e.g. postgresql://...); default: <study_dir>/journal.log."
    )
    parser.add_argument("--study_name", help="The study's name in the storage (default: the name of --study_dir).")
    args = parser.parse_args(argv)
    study_dir = args.study_dir or os.path.join("runs", f"tune_{os.path.splitext(os.path.basename(args.config))[0]}")
    from lit_bigmodel.tuning import tune

    try:
        tune(
            args.config, args.search, study_dir=study_dir, n_trials=args.n_trials, timeout=args.timeout,
            sampler=args.sampler, pruner=args.pruner, seed=args.seed, storage=args.storage, study_name=args.study_name,
        )  # fmt: skip
    except Exception as err:
        _exit_on_user_error(err)
        raise


if __name__ == "__main__":
    main()
