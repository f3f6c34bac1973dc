"""Export a Hugging Face ``save_pretrained`` directory: from a live module, or offline from any Lightning checkpoint.

Offline (``lit-bigmodel export CKPT OUT``) reads a checkpoint written by `SFTModule` or `DistillationModule`
(the student is exported) under any strategy: a single file (single device, DDP, FSDP with
``state_dict_type="full"``), a DeepSpeed ZeRO-1/2/3 checkpoint directory (consolidated to fp32 with
DeepSpeed's ``zero_to_fp32``) or an FSDP / FSDP2 sharded directory (``torch.distributed.checkpoint``). The
network is rebuilt from the config and tokenizer the module stored in the checkpoint; no hub access.

Example::

    lit-bigmodel export runs/sft/checkpoints/last.ckpt out/model
    # or, in Python:
    from lit_bigmodel.export import export_checkpoint
    export_checkpoint("runs/sft/checkpoints/last.ckpt", "out/model")
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_bigmodel.errors import ConfigurationError, DataError, LitBigModelError, MissingPathError, OutputExistsError

CHECKPOINT_KEY = "lit_bigmodel_export"  # what the modules store for an offline export: task, config, tokenizer


def check_target(dirpath: str | os.PathLike[str], overwrite: bool) -> str:
    """The absolute export path; `OutputExistsError` if it is a file, or a non-empty directory and not ``overwrite``."""
    target = os.path.abspath(os.fspath(dirpath))
    if os.path.exists(target) and not os.path.isdir(target):
        raise OutputExistsError(f"export directory {target!r} is a file; choose another export directory.")
    if os.path.isdir(target) and os.listdir(target) and not overwrite:
        raise OutputExistsError(
            f"export directory {target!r} exists and is not empty; pass overwrite=True to replace it."
        )
    return target


def check_finite(state_dict: dict[str, torch.Tensor]) -> None:
    """Raise `ConfigurationError` naming the floating-point tensors of ``state_dict`` that hold NaN or ±inf.

    Example::

        check_finite(network.state_dict())   # before writing an export
    """
    bad = [
        name
        for name, tensor in state_dict.items()
        if isinstance(tensor, torch.Tensor)
        and (tensor.is_floating_point() or tensor.is_complex())
        and tensor.device.type != "meta"
        and not bool(torch.isfinite(tensor).all())
    ]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigurationError(
            f"refusing to export non-finite weights: tensor {bad[0]!r}{more} holds NaN or inf; the training "
            "diverged (lower the learning rate, or check the loss) and nothing was written."
        )


def read_checkpoint(path: str | os.PathLike[str], argument: str = "checkpoint") -> dict[str, Any] | None:
    """Check that ``path`` is a checkpoint Lightning can resume from; return it when it is a single file.

    A file must load with ``torch.load`` and hold a ``state_dict``; a directory must be a DeepSpeed
    checkpoint (a ``latest`` file or ``*/mp_rank_*_model_states.pt``) or a ``torch.distributed.checkpoint``
    (``.metadata``), and is not loaded (None). Errors name ``argument`` and the path.

    Raises:
        MissingPathError: nothing at ``path``, or a directory that is no checkpoint.
        DataError: a file that ``torch.load`` cannot read, or that holds no ``state_dict``.

    Example::

        read_checkpoint("runs/sft/checkpoints/last.ckpt", argument="--ckpt_path")
    """
    name = os.fspath(path)
    where = f"{argument} {name!r}"
    if os.path.isdir(name):
        if _is_deepspeed(Path(name)) or os.path.isfile(os.path.join(name, ".metadata")):
            return None
        raise MissingPathError(
            f"{where} is a directory but not a checkpoint: no DeepSpeed 'latest' file and no "
            "torch.distributed.checkpoint '.metadata' in it."
        )
    if not os.path.isfile(name):
        raise MissingPathError(f"{where} does not exist.")
    try:
        try:
            checkpoint = torch.load(name, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            checkpoint = torch.load(name, map_location="cpu", weights_only=False)  # a legacy (non-zip) file
    except Exception as err:
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        raise DataError(f"{where} is not a checkpoint torch.load can read ({type(err).__name__}: {first}).") from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise DataError(f"{where} holds no 'state_dict': it is not a Lightning checkpoint.")
    return checkpoint


def _is_deepspeed(path: Path) -> bool:
    return (path / "latest").is_file() or any(path.glob("*/mp_rank_*_model_states.pt"))


def write_pretrained(
    target: str, network: nn.Module, tokenizer: Any = None, state_dict: dict[str, torch.Tensor] | None = None
) -> str:
    """Write ``network`` (with ``state_dict`` if given) and ``tokenizer`` into ``target``, complete or not at all.

    Everything is written into a staging folder beside ``target`` and renamed into place.

    Raises:
        ConfigurationError: a floating-point weight holds NaN or inf (nothing is written).
    """
    check_finite(state_dict if state_dict is not None else network.state_dict())
    if state_dict is not None:  # gathered copies of tied weights: one tensor again, so transformers writes it once
        state_dict = dict(state_dict)
        names: dict[int, str] = {}
        for name, param in network.named_parameters(remove_duplicate=False):
            first = names.setdefault(id(param), name)
            if first != name and first in state_dict and name in state_dict:
                state_dict[name] = state_dict[first]

    def save(staging: str) -> None:
        network.save_pretrained(staging, state_dict=state_dict)  # type: ignore[operator]
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_staged(target, save)


def write_staged(target: str, write: Callable[[str], None]) -> str:
    """Run ``write(folder)`` on a staging folder beside ``target``, then rename it into place; returns ``target``.

    ``target`` is complete or as it was: a failed ``write`` leaves it untouched, and an existing
    ``target`` is replaced only once the new folder is whole.

    Example::

        write_staged("out/model", lambda folder: network.save_pretrained(folder))
    """
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        write(staging)
        if os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.", dir=parent)
            os.replace(target, os.path.join(old, "dir"))
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return target


def export_info(task: str, network: nn.Module, tokenizer: Any) -> dict[str, Any] | None:
    """What `export_checkpoint` needs besides the weights (None for a network without a Hugging Face config)."""
    config = getattr(network, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(network, "save_pretrained"):
        return None
    files: dict[str, bytes] = {}
    if tokenizer is not None:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for name in sorted(os.listdir(folder)):
                files[name] = Path(folder, name).read_bytes()
    return {"task": task, "config": config.to_dict(), "tokenizer_files": files}


def load_consolidated(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning checkpoint as one dict with a full ``state_dict``, whatever strategy wrote it (on CPU)."""
    loaded = read_checkpoint(path)
    if loaded is not None:
        return loaded
    path = Path(path)
    if _is_deepspeed(path):
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as folder:
            return convert_zero_checkpoint_to_fp32_state_dict(path, os.path.join(folder, "full.ckpt"))
    if (path / ".metadata").is_file():  # torch.distributed.checkpoint (FSDP / FSDP2 sharded)
        from lit_bigmodel._internals import load_distributed_checkpoint

        full = load_distributed_checkpoint(path)
        if "state_dict" not in full and isinstance(full.get("model"), dict):
            full["state_dict"] = full.pop("model")  # Lightning's FSDP sharded layout keeps the weights as "model"
        return full
    raise MissingPathError(f"checkpoint {str(path)!r} is not a DeepSpeed or torch.distributed.checkpoint directory.")


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    dirpath: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    prefix: str = "model.",
    merge: bool = True,
    base: str | os.PathLike[str] | None = None,
) -> str:
    """Rebuild the network stored in a Lightning ``checkpoint`` and write it as a ``save_pretrained`` directory.

    Args:
        checkpoint: a checkpoint file or a sharded checkpoint directory (DeepSpeed, FSDP, FSDP2).
        dirpath: the output directory; written beside and renamed into place.
        overwrite: replace a non-empty ``dirpath``.
        prefix: the network's attribute in the module's state dict (``"model."``: the SFT model, the student).
        merge: with ``peft`` adapters, write the merged model (True) or the adapter folder (False).
        base: with an adapter-only checkpoint, the base model's ``save_pretrained`` directory (the
            checkpoint identifies the base but does not hold it); checked against its fingerprint.

    Raises:
        MissingPathError: no checkpoint at ``checkpoint``.
        OutputExistsError: ``dirpath`` is not empty and ``overwrite`` is False (checked before loading).
        ConfigurationError: the checkpoint was not written by our modules, or its weights do not fit.
    """
    from transformers import AutoConfig

    from lit_bigmodel.nets.builders import build_model

    target = check_target(dirpath, overwrite)
    full = load_consolidated(checkpoint)
    info = full.get(CHECKPOINT_KEY)
    if info is None:
        raise ConfigurationError(
            f"checkpoint {os.fspath(checkpoint)!r} has no {CHECKPOINT_KEY!r} entry: it was not written by "
            "SFTModule / DistillationModule, or their network is not a Hugging Face model."
        )
    state = {key[len(prefix) :]: value for key, value in full["state_dict"].items() if key.startswith(prefix)}
    if not state:
        raise ConfigurationError(f"no weights under {prefix!r} in the checkpoint's state_dict.")
    config_dict = dict(info["config"])
    config = AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    tokenizer = None
    if info["tokenizer_files"]:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as folder:
            for name, data in info["tokenizer_files"].items():
                Path(folder, name).write_bytes(data)
            tokenizer = AutoTokenizer.from_pretrained(folder)
    peft_values = info.get("peft")
    if peft_values is None and not merge:
        raise ConfigurationError("`merge=False` exports adapters, but the checkpoint holds no `peft` adapters.")
    if peft_values is not None:
        from lit_bigmodel.adapters import ADAPTERS_KEY, check_same_base, export_adapters, load_adapted

        adapter_only = ADAPTERS_KEY in full
        if adapter_only and base is None:
            raise ConfigurationError(
                "the checkpoint holds adapter weights only: pass the base model's save_pretrained directory "
                "(`--base DIR`), or train with `full_checkpoints=True`."
            )
        network = build_model(os.fspath(base) if adapter_only and base is not None else config, info["task"])
        wrapper = load_adapted(network, peft_values, info["task"], state, adapter_only)
        if adapter_only:
            check_same_base(full, wrapper.get_base_model())
        return export_adapters(target, wrapper, tokenizer, merge=merge)
    network = build_model(config, info["task"])
    missing, unexpected = network.load_state_dict(state, strict=False)
    tied = set(getattr(network, "_tied_weights_keys", None) or ())
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ConfigurationError(
            f"the checkpoint's weights do not fit the stored config: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    tie_weights = getattr(network, "tie_weights", None)
    if callable(tie_weights):
        tie_weights()
    return write_pretrained(target, network, tokenizer)


def main(argv: list[str] | None = None) -> None:
    """``lit-bigmodel export CKPT OUT [--overwrite] [--adapters-only] [--base DIR]``; input errors exit with status 2."""
    parser = argparse.ArgumentParser(
        prog="lit-bigmodel export",
        description="Write a save_pretrained directory from a checkpoint of SFTModule / DistillationModule "
        "(a file, or a DeepSpeed / FSDP sharded checkpoint directory).",
    )
    parser.add_argument("checkpoint", help="checkpoint file or sharded checkpoint directory")
    parser.add_argument("out", help="output directory (must be empty or absent unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    parser.add_argument(
        "--adapters-only", action="store_true", help="peft checkpoints: write the adapter folder, not the merged model"
    )
    parser.add_argument("--base", help="adapter-only peft checkpoints: the base model's save_pretrained directory")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(
            args.checkpoint, args.out, overwrite=args.overwrite, merge=not args.adapters_only, base=args.base
        )
    except LitBigModelError as err:
        print(f"lit-bigmodel export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"Exported {args.checkpoint} to {path}")
