"""`Float8Training`: torchao float8 training as a precision preset, for GPUs with fp8 tensor cores (H100, H200).

The network's ``nn.Linear`` layers become torchao ``Float8Linear`` layers: their matmuls (forward and
both backward ones) run in float8 with dynamic scales, while weights, optimizer state and every other
operation keep the Trainer's precision (bf16). Works on one device and under DDP; FSDP, FSDP2 and
DeepSpeed are refused before anything is built (see `fp8_problems`).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.quantization.schemes import require_torchao

__all__ = ["Float8Training", "convert_to_fp8", "fp8_problems"]

Recipe = Literal["tensorwise", "rowwise", "rowwise_with_gw_hp"]
RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")
MIN_CAPABILITY = (8, 9)  # Ada (L4, L40, RTX 4090) and Hopper (H100, H200): fp8 tensor cores
_PRECISIONS = ("bf16-mixed", "bf16-true")
_REFUSED = {
    "FSDPStrategy": "FSDP1 flattens each unit's weights into one FlatParameter, and torchao's float8 layers need "
    "per-parameter (DTensor) sharding: use fsdp2_strategy() once the module converts before sharding, or ddp",
    "ModelParallelStrategy": "FSDP2 shards the network inside the module's configure_model, and torchao's float8 "
    "layers must be swapped in before fully_shard, which a callback cannot reach: use ddp, or convert in the "
    "module with `convert_to_fp8(network)` before `fully_shard`",
    "DeepSpeedStrategy": "DeepSpeed's engine owns the precision and the optimizer's copies of the weights, which "
    "torchao's float8 layers do not know: use ddp",
}


def fp8_problems(
    strategy: Any, device: torch.device, precision: str, capability: tuple[int, int] | None = None
) -> list[str]:
    """Why float8 training cannot run with ``strategy`` (a Lightning strategy), ``device`` and ``precision``.

    Empty when it can. ``capability`` is the CUDA device's compute capability (read from the device when None).

    Example::

        fp8_problems(DDPStrategy(), torch.device("cuda:0"), "bf16-mixed")   # [] on an H100
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    kinds = {
        "FSDPStrategy": FSDPStrategy,
        "ModelParallelStrategy": ModelParallelStrategy,
        "DeepSpeedStrategy": DeepSpeedStrategy,
    }
    problems = []
    if device.type != "cuda":
        problems.append(
            f"fp8 training needs an NVIDIA GPU with fp8 tensor cores (compute capability >= 8.9: H100, H200, L4, L40, "
            f"RTX 4090), and the device is {device.type.upper()}."
        )
    else:
        capability = capability or torch.cuda.get_device_capability(device)
        if tuple(capability) < MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "this GPU"
            problems.append(
                f"fp8 training needs compute capability >= 8.9 (H100, H200, L4, L40, RTX 4090); {name} has "
                f"{capability[0]}.{capability[1]}. Train in bf16 instead (precision='bf16-mixed')."
            )
    for refused, why in _REFUSED.items():
        if isinstance(strategy, kinds[refused]):
            problems.append(f"Float8Training does not support {type(strategy).__name__}: {why}.")
    if precision not in _PRECISIONS:
        problems.append(
            f"Float8Training needs the Trainer's precision to be one of {_PRECISIONS} (the non-matmul work runs in "
            f"bf16), got {precision!r}."
        )
    return problems


def convert_to_fp8(network: nn.Module, recipe: Recipe = "tensorwise", *, trainable_only: bool = True) -> list[str]:
    """Swap the eligible ``nn.Linear`` layers of ``network`` for torchao ``Float8Linear`` (same parameters); their names.

    Eligible: both sizes multiples of 16 (what fp8 matmuls take), not the output layer (LM head or
    classifier), and, with ``trainable_only``, a weight that requires grad (a frozen teacher stays bf16).

    Raises:
        ConfigurationError: no layer is eligible (GPT-2's ``Conv1D`` projections, for one).
    """
    require_torchao()
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    from lit_bigmodel.quantization.layers import _conv1d_layers, _output_layer

    output = _output_layer(network)
    chosen = [
        name
        for name, module in network.named_modules()
        if type(module) is nn.Linear
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
        and module is not output
        and name != output
        and (module.weight.requires_grad or not trainable_only)
    ]
    if not chosen:
        conv1d = _conv1d_layers(network)
        why = (
            f"its {len(conv1d)} projection layers are transformers' Conv1D (GPT-2), which torchao's float8 does "
            "not convert"
            if conv1d
            else "it has no trainable nn.Linear layer with both sizes multiples of 16 other than the output layer"
        )
        raise ConfigurationError(
            f"no layer of the network can train in float8: {why}; train in bf16 (without Float8Training), "
            "or use a network with nn.Linear projections (Llama, Qwen2, Mistral)."
        )
    names = set(chosen)
    config = Float8LinearConfig.from_recipe_name(recipe)
    convert_to_float8_training(network, module_filter_fn=lambda module, name: name in names, config=config)
    return chosen


class Float8Training(Callback):
    """Train the network's linear layers in float8 (torchao), on GPUs with fp8 tensor cores.

    Use with ``precision="bf16-mixed"`` (float32 master weights) or ``"bf16-true"``. At ``on_fit_start``
    the network's eligible ``nn.Linear`` layers (`convert_to_fp8`) become torchao ``Float8Linear``
    layers holding the same parameters, so the optimizer, checkpoints (same keys) and ``export`` (plain
    weights) are unchanged. Pair it with ``torch.compile`` (`SFTModule` compiles on CUDA by default):
    eager float8 spends the saved matmul time on unfused casts.

    Strategies: one device and DDP. FSDP1, FSDP2 and DeepSpeed are refused in ``setup``, before the
    network is built, as are a device without fp8 tensor cores (CPU, A100) and a precision other
    than bf16 (`fp8_problems`).

    Args:
        recipe: torchao's scaling recipe: ``"tensorwise"`` (fastest), ``"rowwise"``, ``"rowwise_with_gw_hp"``
            (most accurate).
        network: the LightningModule's attribute holding the network (``"model"``: `SFTModule`'s network,
            `DistillationModule`'s student; its teacher stays bf16).

    Raises:
        ConfigurationError: an unknown recipe; in ``setup``, everything `fp8_problems` finds, in one message;
            at fit start, a network with no layer to convert (`convert_to_fp8`).

    Example::

        trainer = L.Trainer(accelerator="gpu", precision="bf16-mixed", callbacks=[Float8Training()])
        trainer.fit(SFTModule("path/to/llama"), dm)
    """

    def __init__(self, recipe: Recipe = "tensorwise", network: str = "model") -> None:
        if recipe not in RECIPES:
            raise ConfigurationError(f"`recipe` must be one of {RECIPES}, got {recipe!r}.")
        self.recipe = recipe
        self.network_attribute = network
        self.layers: list[str] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        problems = fp8_problems(trainer.strategy, trainer.strategy.root_device, str(trainer.precision))
        if problems:
            raise ConfigurationError(" ".join(problems))
        if getattr(pl_module, "compile_mode", True) is False:
            rank_zero_warn(
                "Float8Training without torch.compile: the float8 casts run unfused, usually slower than bf16."
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network: Any = getattr(pl_module, self.network_attribute, None)
        if not isinstance(network, nn.Module):
            raise ConfigurationError(
                f"Float8Training: the LightningModule has no network at `{self.network_attribute}`."
            )
        self.layers = convert_to_fp8(getattr(network, "_orig_mod", network), self.recipe)
        rank_zero_info(f"Float8Training: {len(self.layers)} linear layers train in float8 ({self.recipe}).")
