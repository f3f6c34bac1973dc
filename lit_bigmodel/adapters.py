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
from typing import Any, cast

import torch
from torch import nn

from lit_bigmodel._quiet import quiet_imports
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.export import check_finite, write_staged

try:  # optional dependency: the type of SFTModule's `peft` argument (the CLI reads it)
    with quiet_imports():
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


def apply_adapters(network: nn.Module, config: Any, task: str, match_base_dtype: bool = False) -> tuple[nn.Module, Any]:
    """Inject ``config``'s adapters into ``network``; returns ``(network with adapters, PeftModel wrapper)``.

    Only the adapters (and, for a classifier, its head, as peft's modules to save) require grad. The
    task type is filled in from ``task`` when ``config`` leaves it unset.

    ``match_base_dtype``: give the adapters the dtype of the frozen base (peft otherwise keeps adapters
    next to a float16 / bfloat16 base in float32). FSDP1 flattens a unit's parameters, frozen and
    trainable, into one tensor of one dtype, so the modules ask for it under FSDP.

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
        wrapper = get_peft_model(network, config, autocast_adapter_dtype=not match_base_dtype)
    except ValueError as err:  # NoMatchingPeftModuleError and peft's other checks
        targets = getattr(config, "target_modules", None)
        raise ConfigurationError(
            f"`peft` could not adapt {type(network).__name__} (target_modules={targets!r}): {err} "
            "Name modules of the network (e.g. ['q_proj', 'v_proj']) or use target_modules='all-linear'."
        ) from err
    if match_base_dtype:
        _cast_trainable_to_base_dtype(network)
    return wrapper.get_base_model(), wrapper


def uniform_trainable_dtype(network: nn.Module) -> None:
    """Where ``network``'s trainable parameters have several dtypes, give them the frozen base's.

    FSDP2 shards frozen and trainable parameters of other dtypes side by side, but wants one dtype among
    the trainable ones of a unit: float32 LoRA weights beside a bfloat16 classifier head (peft's copy of
    the base's head, a module to save) are not. Float32 adapters alone are left as they are.
    """
    if len({p.dtype for p in network.parameters() if p.requires_grad and p.is_floating_point()}) > 1:
        _cast_trainable_to_base_dtype(network)


def _cast_trainable_to_base_dtype(network: nn.Module) -> None:
    """Cast the trainable floating-point parameters to the dtype of the frozen ones, when those share one."""
    frozen = {p.dtype for p in network.parameters() if not p.requires_grad and p.is_floating_point()}
    if len(frozen) != 1:
        return  # a base of mixed dtypes (or none frozen): peft's per-layer dtype is all there is to go by
    dtype = frozen.pop()
    for param in network.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


# The names FSDP1's wrappers (and activation checkpointing's) insert into parameter names; state dicts leave them out.
_WRAPPER_NAMES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_parameter_name(name: str) -> str:
    """``name`` without the wrapper segments FSDP1, activation checkpointing and ``torch.compile`` insert."""
    for part in _WRAPPER_NAMES:
        name = name.replace(part, "")
    return name


def adapter_keys(module: nn.Module, prefix: str = "") -> set[str]:
    """State-dict keys of ``module``'s parameters that require grad (adapters, modules to save, projections).

    Names as state dicts spell them: without the segments FSDP1's wrappers add to a wrapped module's names.
    """
    return {f"{prefix}{clean_parameter_name(name)}" for name, param in module.named_parameters() if param.requires_grad}


def _holds_sharded_parameters(network: nn.Module) -> bool:
    """Whether ``network``'s parameters are shards: FSDP1 / FSDP2 units, DTensors, ZeRO-3 partitions."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        wrappers: tuple[type, ...] = (FSDPModule, FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch without distributed
        wrappers = ()
    if wrappers and any(isinstance(module, wrappers) for module in network.modules()):
        return True
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return any(hasattr(p, "ds_id") for p in network.parameters())
    return any(hasattr(p, "ds_id") or isinstance(p, DTensor) for p in network.parameters())


@torch.no_grad()
def base_fingerprint(network: nn.Module) -> list[float]:
    """Two float64 sums over the frozen parameters (plain and position-weighted): equal bases give equal sums.

    Returns ``[]`` where the weights are not all here: meta tensors, or sharded parameters (FSDP1 flat
    parameters or their views, FSDP2 DTensors, ZeRO-3 partitions). It reads local tensors only and
    runs no collective; the modules take it when they build the network, before any sharding.
    """
    if _holds_sharded_parameters(network):
        return []
    frozen = [p for p in network.parameters() if not p.requires_grad]
    if any(p.is_meta or type(p) is not nn.Parameter or p.numel() == 0 for p in frozen):
        return []
    if not frozen:
        return [0.0, 0.0]
    totals = torch.stack([p.detach().sum(dtype=torch.float64).cpu() for p in frozen])
    weights = torch.arange(1, len(frozen) + 1, dtype=torch.float64)
    return [float(totals.sum()), float((totals * weights).sum())]


def holds_shards(state: dict[str, Any]) -> bool:
    """Whether a state dict holds sharded tensors (FSDP's and FSDP2's distributed checkpoints: DTensor, ShardedTensor)."""
    try:
        from torch.distributed._shard.sharded_tensor import ShardedTensor
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(value, (DTensor, ShardedTensor)) for value in state.values())


def keep_adapter_weights_only(
    checkpoint: dict[str, Any], module: nn.Module, fingerprint: list[float] | None = None
) -> None:
    """Make ``checkpoint`` adapter-only: drop the frozen weights of ``module.model`` (and of a teacher).

    What trains stays (adapters, modules to save, distillation projections), with the module's other
    state, and a fingerprint of the frozen base (``fingerprint``, default `base_fingerprint` of
    ``module.model``) that `check_same_base` compares on resume.

    A distributed checkpoint (FSDP / FSDP2 sharded state: each rank writes its own shards) is left
    whole: Lightning's sharded load reads every key of the model from the directory, so a checkpoint
    without the base could not be resumed. An empty state dict (the ranks other than zero under a
    full-state-dict strategy) is left alone.
    """
    state = checkpoint.get("state_dict")
    if not state or holds_shards(state):
        return
    trainable = adapter_keys(module)
    frozen_roots = ("model.", "teacher.")
    checkpoint["state_dict"] = {
        key: value for key, value in state.items() if key in trainable or not key.startswith(frozen_roots)
    }
    if fingerprint is None:
        fingerprint = base_fingerprint(getattr(module, "model"))  # noqa: B009 - the LightningModule's network
    checkpoint[ADAPTERS_KEY] = {
        "base_fingerprint": list(fingerprint),
        "dropped": len(state) - len(checkpoint["state_dict"]),
    }


def check_same_base(checkpoint: dict[str, Any], network: nn.Module, here: list[float] | None = None) -> None:
    """Raise if ``network``'s frozen base differs from the one an adapter-only ``checkpoint`` was trained on.

    ``here``: the fingerprint of ``network``'s base if already known (the modules take it before sharding);
    default `base_fingerprint` of ``network``. Either side empty (a sharded base): nothing is compared.
    """
    saved = checkpoint[ADAPTERS_KEY].get("base_fingerprint") or []
    if here is None:
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

    def write(staging: str) -> None:
        save(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_staged(target, write)


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


def adapted_copy(network: nn.Module, wrapper: Any, task: str, state: dict[str, torch.Tensor]) -> Any:
    """A CPU copy of an adapted network, from its full ``state`` (gathered from a sharded run); its ``PeftModel``.

    The base is rebuilt on the CPU from ``network``'s config (fresh weights, drawn without touching the
    caller's random state), given ``wrapper``'s adapters (`load_adapted`), then every weight is loaded
    from ``state``: the copy can merge and save, which sharded parameters (ZeRO-3 partitions, FSDP
    shards) cannot.

    Raises:
        ConfigurationError: ``network`` has no Hugging Face config, or ``state`` does not fit the copy.
    """
    from lit_bigmodel.nets.builders import Task, build_model

    config = getattr(network, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ConfigurationError(
            f"exporting adapters from a sharded run rebuilds the network from its config, and "
            f"{type(network).__name__} has none: it is not a Hugging Face model."
        )
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # the copy holds full-precision (dequantized) weights
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):  # base and adapters draw fresh weights: keep this rank's random stream
        base = build_model(config, cast(Task, task))
        return load_adapted(base, peft_config_dict(wrapper), task, state, adapter_only=False)
