"""What the modules need to know about sharded strategies: build under ZeRO-3, gather a full state dict."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, cast

import torch
from torch import nn


def zero_stage(trainer: Any) -> int | None:
    """The DeepSpeed ZeRO stage of ``trainer``'s strategy, or None for any other strategy (or no trainer)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    strategy = getattr(trainer, "strategy", None)
    if not isinstance(strategy, DeepSpeedStrategy):
        return None
    return int((getattr(strategy, "config", None) or {}).get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(trainer: Any) -> bool:
    """Whether ``trainer``'s DeepSpeed strategy keeps the optimizer state on the CPU (ZeRO-Offload)."""
    if zero_stage(trainer) is None:
        return False
    offload = (trainer.strategy.config or {}).get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device") in ("cpu", "nvme")


def is_fsdp(trainer: Any) -> bool:
    """Whether ``trainer`` shards with FSDP (``FSDPStrategy``) or FSDP2 (``ModelParallelStrategy``)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), (FSDPStrategy, ModelParallelStrategy))


def is_fsdp2(trainer: Any) -> bool:
    """Whether ``trainer`` runs `ModelParallelStrategy` (FSDP2's ``fully_shard``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def shards_parameters(trainer: Any) -> bool:
    """Whether each rank holds only shards of the parameters: ZeRO-3, FSDP or FSDP2."""
    return zero_stage(trainer) == 3 or is_fsdp(trainer)


def is_sharded(trainer: Any) -> bool:
    """Whether ``trainer``'s strategy splits weights or optimizer state across ranks: DeepSpeed (any ZeRO stage),
    FSDP or FSDP2; callbacks that need whole weights on one rank (copies, masks) refuse these."""
    return zero_stage(trainer) is not None or is_fsdp(trainer)


@contextlib.contextmanager
def hf_zero3_loading(trainer: Any) -> Iterator[None]:
    """Let ``transformers`` build and load a model the ZeRO-3 way while the model is built.

    Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``, so parameters are partitioned (size 0)
    as soon as each submodule is built; ``from_pretrained`` then fails to copy the checkpoint in, and the
    model's own weight init touches empty tensors. With an ``HfDeepSpeedConfig`` alive, transformers gathers
    each partitioned parameter to load or initialise it (its documented ZeRO-3 path). Outside ZeRO-3: nothing.
    """
    if zero_stage(trainer) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    config = HfDeepSpeedConfig(trainer.strategy.config)  # transformers keeps a weak reference: keep it alive
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del config


@contextlib.contextmanager
def outside_zero_init(trainer: Any) -> Iterator[None]:
    """Under ZeRO-3, build modules whole for a while inside ``configure_model`` (a no-op otherwise).

    Lightning runs ``configure_model`` inside ``deepspeed.zero.Init``, which partitions each module's
    parameters as soon as it is built, so an initialiser that runs afterwards (peft's ``zeros_`` on
    LoRA's B, say) writes into an empty tensor and is lost. Modules built here stay whole (and are
    initialised as on one device); DeepSpeed partitions them when it sets the model up.
    """
    if zero_stage(trainer) != 3:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import restore_init_context, shutdown_init_context

    shutdown_init_context()
    try:
        yield
    finally:
        restore_init_context()


def full_state_dict(trainer: Any, root: nn.Module, network: nn.Module) -> dict[str, torch.Tensor] | None:
    """The full (unsharded) state dict of ``network``, a submodule of the LightningModule ``root``, on CPU.

    Collective under sharded strategies: every rank must call it. Returns the state dict on global rank
    zero and None on the other ranks. ZeRO-3 parameters are gathered one at a time (peak memory: one
    parameter); FSDP / FSDP2 through ``torch.distributed.checkpoint``'s full state dict (rank zero, CPU).
    """
    rank_zero = trainer is None or trainer.is_global_zero
    stage = zero_stage(trainer)
    if stage == 3:
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        for key, value in network.state_dict(keep_vars=True).items():
            if hasattr(value, "ds_id"):  # a partitioned parameter
                with deepspeed.zero.GatheredParameters([value], modifier_rank=None):
                    if rank_zero:
                        state[key] = value.detach().cpu().clone()
            elif rank_zero:
                state[key] = value.detach().cpu().clone()
        return state if rank_zero else None
    if is_fsdp(trainer):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        prefix = next((name for name, module in root.named_modules() if module is network), None)
        if prefix is None:
            raise ValueError(f"{type(network).__name__} is not a submodule of {type(root).__name__}.")
        wrapped = trainer.strategy.model  # FSDP's root unit (FSDP1) or the module itself (FSDP2)
        # cpu_offload=True (rank 0 alone holds the result) crashes FSDP1 when the parameters already are on the
        # CPU (CPU FSDP, for debugging): there, every rank gathers the full state dict.
        offload = trainer.strategy.root_device.type != "cpu"
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        if not rank_zero:
            return None
        head = prefix + "."
        return {
            key[len(head) :]: cast(torch.Tensor, value).detach().cpu()
            for key, value in full.items()
            if key.startswith(head)
        }
    if not rank_zero:
        return None
    return {key: value.detach().cpu() for key, value in network.state_dict().items()}
