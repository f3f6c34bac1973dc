"""Parameter-efficient fine-tuning through Hugging Face ``peft``: apply, checkpoint and export adapters.

`apply_adapters` wraps a built network with ``peft.get_peft_model`` (LoRA, DoRA, rsLoRA, ... from any
``peft.PeftConfig``) and returns the network with the adapter layers injected, which the module trains
and calls as before, and the ``PeftModel`` that knows how to save and merge them. `adapter_keys` is
what an adapter-only checkpoint keeps; `base_fingerprint` identifies the frozen base weights, so a
resume from such a checkpoint can tell that it rebuilt the same base.

Example::

    from peft import LoraConfig
    network, wrapper = apply_adapters(model, LoraConfig(r=8, target_modules="all-linear"), "causal_lm")
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any

import torch
from torch import nn

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.export import check_finite

try:  # optional dependency: the type of SFTModule's `peft` argument (the CLI reads it)
    from peft import PeftConfig
except ImportError:  # pragma: no cover - without peft, `peft=` is refused with how to install it
    PeftConfig = Any  # type: ignore[misc,assignment]

ADAPTERS_KEY = "lit_bigmodel_adapters"  # in adapter-only checkpoints: what identifies the frozen base

_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS"}


def check_peft_config(config: Any, task: str) -> str | None:
    """Why ``config`` cannot adapt a ``task`` network (None when it can); checked before anything is built."""
    try:
        from peft import PeftConfig
    except ImportError:
        return "`peft` needs the peft package: pip install 'lit-bigmodel[peft]' (or pip install peft)."
    if not isinstance(config, PeftConfig):
        return f"`peft` must be a peft.PeftConfig (e.g. peft.LoraConfig), got {type(config).__name__}."
    task_type = getattr(config, "task_type", None)
    task_type = getattr(task_type, "value", task_type)
    expected = _TASK_TYPES.get(task)
    if task_type is not None and expected is not None and task_type != expected:
        return f"`peft` has task_type={task_type!r}, but the module's task {task!r} needs {expected!r} (or None)."
    return None


def apply_adapters(network: nn.Module, config: Any, task: str) -> tuple[nn.Module, Any]:
    """Inject ``config``'s adapters into ``network``; returns ``(network with adapters, PeftModel wrapper)``.

    Only the adapters (and, for a classifier, its head, as peft's modules to save) require grad. The
    task type is filled in from ``task`` when ``config`` leaves it unset.

    Raises:
        ConfigurationError: ``config`` is not a ``PeftConfig``, contradicts ``task``, or its target
            modules match nothing in ``network``.
    """
    problem = check_peft_config(config, task)
    if problem is not None:
        raise ConfigurationError(problem)
    from peft import get_peft_model

    if getattr(config, "task_type", None) is None:
        config = dataclasses.replace(config, task_type=_TASK_TYPES[task])
    else:
        config = copy.deepcopy(config)  # peft writes into the config it is given
    try:
        wrapper = get_peft_model(network, config)
    except ValueError as err:  # NoMatchingPeftModuleError and peft's other checks
        targets = getattr(config, "target_modules", None)
        raise ConfigurationError(
            f"`peft` could not adapt {type(network).__name__} (target_modules={targets!r}): {err} "
            "Name modules of the network (e.g. ['q_proj', 'v_proj']) or use target_modules='all-linear'."
        ) from err
    return wrapper.get_base_model(), wrapper


def adapter_keys(module: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of ``module``'s parameters that require grad (adapters, modules to save, projections)."""
    return {f"{prefix}{name}" for name, param in module.named_parameters() if param.requires_grad}


@torch.no_grad()
def base_fingerprint(network: nn.Module) -> list[float]:
    """Two float64 sums over the frozen parameters (plain and position-weighted): equal bases give equal sums.

    Returns ``[]`` where the weights are not all here (meta or sharded tensors): nothing to compare.
    """
    plain = weighted = 0.0
    for index, param in enumerate(p for p in network.parameters() if not p.requires_grad):
        if param.is_meta or type(param) is not nn.Parameter or param.numel() == 0:
            return []
        total = param.detach().double().sum().item()
        plain += total
        weighted += (index + 1) * total
    return [plain, weighted]


def keep_adapter_weights_only(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Make ``checkpoint`` adapter-only: drop the frozen weights of ``module.model`` (and of a teacher).

    What trains stays (adapters, modules to save, distillation projections), with the module's other
    state, and a fingerprint of the frozen base (`base_fingerprint`) that `check_same_base` compares
    on resume.
    """
    state = checkpoint.get("state_dict")
    if not state:
        return  # DeepSpeed keeps the weights in its own files
    trainable = adapter_keys(module)
    frozen_roots = ("model.", "teacher.")
    checkpoint["state_dict"] = {
        key: value for key, value in state.items() if key in trainable or not key.startswith(frozen_roots)
    }
    network = getattr(module, "model")  # noqa: B009 - the LightningModule's network
    checkpoint[ADAPTERS_KEY] = {
        "base_fingerprint": base_fingerprint(network),
        "dropped": len(state) - len(checkpoint["state_dict"]),
    }


def check_same_base(checkpoint: dict[str, Any], network: nn.Module) -> None:
    """Raise if ``network``'s frozen base differs from the one an adapter-only ``checkpoint`` was trained on."""
    saved = checkpoint[ADAPTERS_KEY].get("base_fingerprint") or []
    here = base_fingerprint(network)
    if saved and here and any(abs(a - b) > 1e-6 * max(1.0, abs(a)) for a, b in zip(saved, here)):
        raise ConfigurationError(
            "the checkpoint holds adapter weights only, and the base model built from `model` is not the one "
            f"they were trained on (fingerprint {here} vs {saved}): build the same base (the same directory, or "
            "the same config and seed), or save checkpoints with `full_checkpoints=True`."
        )


def export_adapters(target: str, wrapper: Any, tokenizer: Any = None, merge: bool = True) -> str:
    """Write ``wrapper`` (a ``peft.PeftModel``) into ``target``: merged into a plain model, or its adapter folder.

    Merged: a copy of the network with the adapters merged into the base weights, written with
    ``save_pretrained`` (``transformers`` loads it with no peft). Not merged: peft's adapter folder
    (``adapter_config.json``, ``adapter_model.safetensors``), which ``PeftModel.from_pretrained``
    loads onto the base model. The tokenizer goes beside either. Written into a staging folder and
    renamed into place, so ``target`` is complete or absent.
    """
    if merge:
        network = copy.deepcopy(wrapper).merge_and_unload()
        check_finite(network.state_dict())
        save: Any = network.save_pretrained
    else:
        check_finite({k: v for k, v in wrapper.named_parameters() if v.requires_grad})
        save = wrapper.save_pretrained
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
    try:
        save(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if os.path.exists(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return target


def peft_config_dict(wrapper: Any) -> dict[str, Any]:
    """The adapters' config as plain JSON types (for checkpoints); `peft_config_from_dict` reads it back."""
    config = wrapper.peft_config[wrapper.active_adapter]
    encoded = json.dumps(config.to_dict(), default=lambda o: sorted(o) if isinstance(o, set) else str(o))
    return dict(json.loads(encoded))


def peft_config_from_dict(values: dict[str, Any]) -> Any:
    """The ``peft.PeftConfig`` that `peft_config_dict` wrote."""
    from peft import PeftConfig as Config

    return Config.from_peft_type(**values)


def load_adapted(
    network: nn.Module, peft_values: dict[str, Any], task: str, state: dict[str, torch.Tensor], adapter_only: bool
) -> Any:
    """``network`` with the checkpoint's adapters, loaded from ``state``; returns the ``PeftModel`` wrapper.

    Raises:
        ConfigurationError: ``state`` does not fit (an adapter weight missing, or weights the network lacks).
    """
    adapted, wrapper = apply_adapters(network, peft_config_from_dict(peft_values), task)
    missing, unexpected = adapted.load_state_dict(state, strict=False)
    trainable = adapter_keys(adapted)
    missing = [key for key in missing if key in trainable or not adapter_only]
    tied = set(getattr(adapted, "_tied_weights_keys", None) or ())
    missing = [key for key in missing if key not in tied]
    if missing or unexpected:
        raise ConfigurationError(
            f"the checkpoint's weights do not fit the adapted network: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )
    return wrapper
