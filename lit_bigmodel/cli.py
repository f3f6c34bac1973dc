"""`lit-bigmodel`: the LightningCLI of the library (fit / validate / test / predict with YAML configs).

Beyond Lightning's own arguments, ``fit`` takes ``--test_after_fit true`` (run the test split
on the trained model and print its metrics) and ``--export_dir DIR`` (write a ``save_pretrained``
directory at the end; ``--export_overwrite true`` to replace a non-empty one). ``lit-bigmodel export
CKPT OUT`` exports a checkpoint offline (any strategy's checkpoint, sharded ones included).

Example::

    lit-bigmodel fit -c configs/sft_tiny.yaml
    lit-bigmodel fit -c configs/sft_tiny.yaml --trainer.max_steps 200 --export_dir out/model
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lit_bigmodel.errors import LitBigModelError, OutputExistsError


class LitBigModelCLI(LightningCLI):
    """LightningCLI with a test-after-fit step, an export step and one-line errors for bad input."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="After fit, run the test split and print its metrics."
        )
        parser.add_argument(
            "--export_dir", type=str | None, default=None, help="After fit, export a save_pretrained directory here."
        )
        parser.add_argument("--export_overwrite", type=bool, default=False, help="Replace a non-empty --export_dir.")

    def before_fit(self) -> None:
        config = self.config[self.subcommand]
        export_dir = config.get("export_dir")
        exists = bool(export_dir) and os.path.isdir(export_dir) and bool(os.listdir(export_dir))
        if exists and not config.get("export_overwrite"):  # fail before training, not after it
            raise OutputExistsError(
                f"--export_dir {export_dir!r} exists and is not empty; add --export_overwrite true."
            )

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
            path = self.model.export(config["export_dir"], overwrite=bool(config.get("export_overwrite")))
            if report:
                print(f"Exported the model to {path}")


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
        cause = _user_error(err)
        if cause is None:
            raise
        print(f"lit-bigmodel: error: {cause}", file=sys.stderr)
        sys.exit(2)


def _user_error(err: BaseException | None) -> LitBigModelError | None:
    """Our own input error behind ``err``: jsonargparse wraps errors raised while instantiating classes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, LitBigModelError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def main() -> None:
    """Entry point of the ``lit-bigmodel`` console script (returns nothing, so the exit status is 0).

    ``lit-bigmodel export CKPT OUT`` writes a ``save_pretrained`` directory from a checkpoint
    (`lit_bigmodel.export`); every other subcommand is LightningCLI's.
    """
    if len(sys.argv) > 1 and sys.argv[1] == "export":
        from lit_bigmodel.export import main as export_main

        export_main(sys.argv[2:])
        return
    run_cli()


if __name__ == "__main__":
    main()
