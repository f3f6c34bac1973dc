"""Sharding presets for Hugging Face models: DeepSpeed ZeRO 1/2/3, FSDP and FSDP2 — with CPU versions for debugging.

Each preset returns a Lightning strategy configured for transformer models: FSDP wraps (and, if asked,
checkpoints) every transformer block, found from the model's ``_no_split_modules`` once the model
exists; DeepSpeed gets ZeRO stage 1, 2 or 3 with optional optimizer and parameter offload. The
mixed-precision policy is left to the Trainer's ``precision`` flag, so the two always agree.

**CPU versions ship in the library.** Lightning's `FSDPStrategy` and `DeepSpeedStrategy` refuse a CPU;
`CPUFSDPStrategy` and `CPUDeepSpeedStrategy` run the same sharded code paths with gloo on CPU
processes, so a user can debug sharding, checkpoints and exports on a laptop, and our CI tests them.
They are for correctness, not speed. The presets pick them when ``accelerator="cpu"``, or with
``accelerator="auto"`` on a machine without CUDA.

Example::

    from lit_bigmodel.strategies import deepspeed_strategy, fsdp_strategy

    Trainer(devices=8, precision="bf16-mixed", strategy=fsdp_strategy("full", activation_checkpointing=True))
    Trainer(devices=8, precision="bf16-mixed", strategy=deepspeed_strategy(3, offload_optimizer=True))
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lit_bigmodel._internals import move_torchmetrics_to_device, setup_activation_checkpointing
from lit_bigmodel.errors import ConfigurationError

Sharding = Literal["full", "grad_op", "hybrid", "none"]
_SHARDING = {"full": "FULL_SHARD", "grad_op": "SHARD_GRAD_OP", "hybrid": "HYBRID_SHARD", "none": "NO_SHARD"}
_ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


class TransformerBlockPolicy:
    """An FSDP auto-wrap policy: wrap every module whose class a Hugging Face model lists in ``_no_split_modules``.

    The names are read from the first module with ``_no_split_modules`` below the root when FSDP first
    calls the policy (the model is built in ``configure_model``, after the strategy); or given as
    ``block_names``. Usable as ``auto_wrap_policy`` and as ``activation_checkpointing_policy``.

    Example::

        FSDPStrategy(auto_wrap_policy=TransformerBlockPolicy(), activation_checkpointing_policy=TransformerBlockPolicy())
    """

    def __init__(self, block_names: Iterable[str] | None = None) -> None:
        self.block_names: set[str] | None = set(block_names) if block_names is not None else None

    def __call__(self, module: nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        if self.block_names is None:  # the first call is the root
            self.block_names = no_split_module_names(module)
            if not self.block_names:
                raise ConfigurationError(
                    "no `_no_split_modules` in the model: it is not a Hugging Face transformer, or its class does "
                    "not list its blocks; pass TransformerBlockPolicy(block_names=[...]) with the block class names."
                )
        if recurse:
            return True
        return type(module).__name__ in self.block_names


def no_split_module_names(root: nn.Module) -> set[str]:
    """The block class names of the Hugging Face models below ``root`` (their ``_no_split_modules``)."""
    names: set[str] = set()
    for module in root.modules():
        listed = getattr(module, "_no_split_modules", None)
        if listed:
            names.update(listed)
    return names


# ---------------------------------------------------------------------------------------------- CPU versions
class CPUFSDPStrategy(FSDPStrategy):
    """`FSDPStrategy` on CPU processes (gloo): for debugging sharded code without GPUs, and for tests.

    Lightning has no public hook for this: the private methods it overrides are listed (and checked
    against the installed Lightning by the tests) in ``lit_bigmodel/_internals.py``.

    Example::

        Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(auto_wrap_policy=TransformerBlockPolicy()))
    """

    strategy_name = "fsdp_cpu"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
            return super()._setup_model(model)
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),  # Lightning passes the CUDA index, None here
            **self.kwargs,
        )
        move_torchmetrics_to_device(wrapped, self.root_device)
        setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        return wrapped


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """`DeepSpeedStrategy` on CPU processes (gloo): ZeRO 1/2/3 without GPUs, for debugging and tests.

    DeepSpeed JIT-compiles a small communication op the first time it runs on a machine (about 45 s).
    The private Lightning methods it overrides are listed and checked in ``lit_bigmodel/_internals.py``.

    Example::

        Trainer(accelerator="cpu", devices=2, strategy=CPUDeepSpeedStrategy(stage=3))
    """

    strategy_name = "deepspeed_cpu"

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # DeepSpeedStrategy's own check refuses any accelerator but CUDA

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()  # (no CUDA device-index check)

    def _get_process_group_backend(self) -> str:
        return self._process_group_backend or "gloo"

    def _initialize_deepspeed_train(self, model: nn.Module) -> None:
        with self._local_device_rank():
            super()._initialize_deepspeed_train(model)

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        with self._local_device_rank():
            super()._initialize_deepspeed_inference(model)

    @contextlib.contextmanager
    def _local_device_rank(self) -> Iterator[None]:
        """Lightning gives ``deepspeed.initialize`` the CUDA index as device rank (None on a CPU): give the local rank."""
        import deepspeed

        initialize = deepspeed.initialize

        def with_rank(*args: Any, **kwargs: Any) -> Any:
            if getattr(kwargs.get("args"), "device_rank", 0) is None:
                kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return initialize(*args, **kwargs)

        deepspeed.initialize = with_rank
        try:
            yield
        finally:
            deepspeed.initialize = initialize


# ---------------------------------------------------------------------------------------------- presets
def fsdp_strategy(
    sharding: Sharding = "full",
    *,
    auto_wrap: bool = True,
    activation_checkpointing: bool = False,
    cpu_offload: bool = False,
    state_dict_type: Literal["full", "sharded"] = "sharded",
    accelerator: str = "auto",
    **kwargs: Any,
) -> FSDPStrategy:
    """FSDP for a Hugging Face model: every transformer block its own FSDP unit.

    Args:
        sharding: ``"full"`` (ZeRO-3-like), ``"grad_op"`` (gradients and optimizer state, ZeRO-2-like),
            ``"hybrid"`` (full within a node, replicated across nodes), ``"none"`` (DDP-like).
        auto_wrap: wrap each block listed in the model's ``_no_split_modules`` (`TransformerBlockPolicy`).
        activation_checkpointing: recompute each block's activations in the backward pass.
        cpu_offload: keep parameters (and gradients) on the CPU between uses.
        state_dict_type: checkpoints as one file per rank (``"sharded"``, fast) or one full file.
        accelerator: ``"cpu"`` gives `CPUFSDPStrategy`; ``"auto"`` does so on a machine without CUDA.
        kwargs: passed to the strategy (e.g. ``mixed_precision`` to override the Trainer's policy).

    Example::

        Trainer(devices=8, precision="bf16-mixed", strategy=fsdp_strategy("full", activation_checkpointing=True))
    """
    problems = []
    if sharding not in _SHARDING:
        problems.append(f"`sharding` must be one of {tuple(_SHARDING)}, got {sharding!r}.")
    if state_dict_type not in ("full", "sharded"):
        problems.append(f"`state_dict_type` must be 'full' or 'sharded', got {state_dict_type!r}.")
    problems += _accelerator_problems(accelerator)
    if problems:
        raise ConfigurationError(" ".join(problems))
    options: dict[str, Any] = {
        "sharding_strategy": _SHARDING[sharding],
        "cpu_offload": cpu_offload,
        "state_dict_type": state_dict_type,
        **kwargs,
    }
    if auto_wrap:
        options.setdefault("auto_wrap_policy", TransformerBlockPolicy())
    if activation_checkpointing:
        options.setdefault("activation_checkpointing_policy", TransformerBlockPolicy())
    cls = CPUFSDPStrategy if _on_cpu(accelerator) else FSDPStrategy
    return cls(**options)


def deepspeed_strategy(
    stage: int = 2,
    *,
    offload_optimizer: bool = False,
    offload_parameters: bool = False,
    param_persistence_threshold: int | None = None,
    accelerator: str = "auto",
    **kwargs: Any,
) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO for a Hugging Face model.

    Stage 1 shards the optimizer state, 2 also the gradients, 3 also the parameters (built sharded:
    the module's ``configure_model`` runs inside ``deepspeed.zero.Init``). Offload moves the optimizer
    state (stage ≥ 1) and the parameters (stage 3) to CPU memory.

    Args:
        stage: 1, 2 or 3.
        offload_optimizer: optimizer state and step on the CPU.
        offload_parameters: parameters on the CPU (stage 3 only).
        param_persistence_threshold: stage 3 keeps parameters with fewer elements than this whole on every
            rank (DeepSpeed's ``stage3_param_persistence_threshold``, default 100,000); 0 partitions all.
        accelerator: ``"cpu"`` gives `CPUDeepSpeedStrategy`; ``"auto"`` does so on a machine without CUDA.
        kwargs: passed to `DeepSpeedStrategy` (e.g. ``config``, ``logging_batch_size_per_gpu``).

    Example::

        Trainer(devices=8, precision="bf16-mixed", strategy=deepspeed_strategy(3, offload_optimizer=True))
    """
    problems = []
    if stage not in (1, 2, 3):
        problems.append(f"`stage` must be 1, 2 or 3, got {stage!r}.")
    if offload_parameters and stage != 3:
        problems.append(f"`offload_parameters` needs stage 3, got stage {stage!r}.")
    if param_persistence_threshold is not None and (stage != 3 or param_persistence_threshold < 0):
        problems.append(
            f"`param_persistence_threshold` needs stage 3 and a count >= 0, got {param_persistence_threshold!r} "
            f"at stage {stage!r}."
        )
    problems += _accelerator_problems(accelerator)
    if problems:
        raise ConfigurationError(" ".join(problems))
    cls = CPUDeepSpeedStrategy if _on_cpu(accelerator) else DeepSpeedStrategy
    strategy = cls(stage=stage, offload_optimizer=offload_optimizer, offload_parameters=offload_parameters, **kwargs)
    if param_persistence_threshold is not None:
        assert strategy.config is not None  # built from the arguments above
        strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = param_persistence_threshold
    return strategy


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` for pure data parallelism with FSDP2: ``data_parallel_size="auto"`` is every process.

    (Lightning's ``"auto"`` means the number of nodes, meant for 2-D parallelism with tensor parallelism
    inside a node.) Works on CPU processes (gloo) too.
    """

    strategy_name = "fsdp2"

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto" and self._tensor_parallel_size == 1:
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def fsdp2_strategy(data_parallel_size: int | Literal["auto"] = "auto", **kwargs: Any) -> ModelParallelStrategy:
    """FSDP2 (``fully_shard``) through Lightning's `ModelParallelStrategy` (works on CPU with gloo too).

    The module shards itself in ``configure_model``: `SFTModule` and `DistillationModule` call
    `fully_shard_blocks` on each network they build (the teacher too) when this strategy is active.

    Args:
        data_parallel_size: processes that shard the model; ``"auto"``: all of them.
        kwargs: passed to `ModelParallelStrategy` (e.g. ``save_distributed_checkpoint``).

    Example::

        Trainer(devices=8, precision="bf16-mixed", strategy=fsdp2_strategy())
    """
    return FSDP2Strategy(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)


def fully_shard_blocks(model: nn.Module, mesh: Any, block_names: Iterable[str] | None = None) -> nn.Module:
    """Apply FSDP2's ``fully_shard`` to each transformer block of ``model``, then to ``model`` itself.

    Args:
        mesh: the data-parallel device mesh (``self.device_mesh["data_parallel"]`` in ``configure_model``).
        block_names: block class names; default: the model's ``_no_split_modules``.
    """
    from torch.distributed.fsdp import fully_shard

    names = set(block_names) if block_names is not None else no_split_module_names(model)
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in names:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _accelerator_problems(accelerator: str) -> list[str]:
    if accelerator not in _ACCELERATORS:
        return [f"`accelerator` must be one of {_ACCELERATORS}, got {accelerator!r}."]
    return []


def _on_cpu(accelerator: str) -> bool:
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
