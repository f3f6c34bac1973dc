"""QLoRA: a base model loaded in 4-bit NF4 (or 8-bit) through bitsandbytes, trained with ``peft`` adapters.

`SFTModule(model=DIR, peft=LoraConfig(...), quantization=BitsAndBytesConfig(load_in_4bit=True, ...))`
loads the base quantized (``from_pretrained(quantization_config=...)``), prepares it for k-bit training
(peft's ``prepare_model_for_kbit_training``: norms in float32, inputs that carry gradients) and gives
the adapters the compute dtype (``bnb_4bit_compute_dtype``, bfloat16 in the QLoRA recipe). Training
needs a CUDA device (`check_quantized_device`). Merging adapters into a quantized base would quantize
the merged weights again (rounding away part of what was learnt): ``export`` asks for
``dequantize=True``, which merges into the dequantized base (`dequantized_state`) and writes it in
the compute dtype; ``merge=False`` writes the adapter folder.

Example::

    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    module = SFTModule(
        "path/to/model",
        peft=LoraConfig(r=16, target_modules="all-linear"),
        quantization=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        ),
    )
    L.Trainer(accelerator="gpu", precision="bf16-mixed").fit(module, dm)
    module.export("out/merged", dequantize=True)
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "check_quantization",
    "check_quantized_device",
    "compute_dtype",
    "dequantized_state",
    "is_quantized",
    "prepare_quantized",
]


def check_quantization(quantization: Any, model: Any, peft: Any) -> str | None:
    """The problem with ``quantization`` (a ``transformers.BitsAndBytesConfig``) for ``model`` and ``peft``, or None.

    A quantized base does not train: it needs ``peft`` adapters; it is quantized as its weights load, so
    ``model`` must be a directory or a hub id; and bitsandbytes must be installed.
    """
    from transformers import BitsAndBytesConfig

    if not isinstance(quantization, BitsAndBytesConfig):
        return (
            "`quantization` must be a transformers.BitsAndBytesConfig (e.g. BitsAndBytesConfig(load_in_4bit=True, "
            f"bnb_4bit_quant_type='nf4')), got {type(quantization).__name__}."
        )
    if not (quantization.load_in_4bit or quantization.load_in_8bit):
        return "`quantization` must set load_in_4bit=True (QLoRA) or load_in_8bit=True, got neither."
    if peft is None:
        return (
            "`quantization` needs `peft` adapters (e.g. peft=LoraConfig(target_modules='all-linear')): "
            "the quantized base weights are frozen, so without adapters nothing trains."
        )
    if not isinstance(model, (str, os.PathLike)):
        return (
            "`quantization` quantizes the base as its weights load: `model` must be a save_pretrained directory "
            f"or a hub id, got {type(model).__name__} (save it with save_pretrained and pass the directory)."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        return "`quantization` needs bitsandbytes: pip install bitsandbytes (QLoRA trains on a CUDA GPU)."
    return None


def check_quantized_device(device: torch.device, strategy: str) -> str | None:
    """The problem with training a quantized base on ``device`` under ``strategy`` (a class name), or None.

    bitsandbytes' 4-bit and 8-bit training kernels are CUDA kernels; the strategies are one device and
    DDP (the quantized weights are not sharded by FSDP / DeepSpeed here).
    """
    if device.type != "cuda":
        return (
            f"`quantization` (QLoRA, a bitsandbytes 4-bit / 8-bit base) trains on a CUDA GPU, and this Trainer runs "
            f"on {device.type!r}: use Trainer(accelerator='gpu') on a machine with CUDA and bitsandbytes, or leave "
            "`quantization` out and train the LoRA adapters on a bfloat16 / float32 base."
        )
    if strategy not in ("SingleDeviceStrategy", "DDPStrategy"):
        return (
            f"`quantization` (QLoRA) runs on one device or under DDP (strategy='ddp'), got {strategy}: FSDP and "
            "DeepSpeed would have to shard bitsandbytes' packed 4-bit weights."
        )
    return None


def compute_dtype(quantization: Any) -> torch.dtype:
    """The dtype a quantized base computes in (``bnb_4bit_compute_dtype``; float32 for 8-bit): the adapters' dtype."""
    dtype = getattr(quantization, "bnb_4bit_compute_dtype", None) if quantization.load_in_4bit else None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def prepare_quantized(network: nn.Module) -> nn.Module:
    """peft's ``prepare_model_for_kbit_training``: every weight frozen, norms and other small weights in float32.

    (Gradient checkpointing is the module's own switch, non-reentrant, so it is not turned on here.)
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(network, use_gradient_checkpointing=False)


def _quantized_linear_types() -> tuple[type, ...]:
    if importlib.util.find_spec("bitsandbytes") is None:
        return ()
    import bitsandbytes as bnb

    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)


def is_quantized(network: nn.Module) -> bool:
    """Whether ``network`` holds bitsandbytes 4-bit or 8-bit linear layers."""
    types = _quantized_linear_types()
    return bool(types) and any(isinstance(module, types) for module in network.modules())


@torch.no_grad()
def dequantized_state(network: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """``network``'s weights by state-dict name, on the CPU in ``dtype``, quantized layers dequantized.

    What a full-precision copy of the network (same config, same adapters) loads to compute what the
    quantized one computes: the adapters can then be merged into the dequantized weights exactly.
    bitsandbytes' quantization statistics (absmax, quant_map, ...) are left out.
    """
    from peft.utils.integrations import dequantize_module_weight

    # state_dict() first: bitsandbytes' CPU inference repacks 4-bit weights into another layout (for its
    # AVX512 kernels), which dequantizing would misread; saving puts them back in the standard layout.
    persistent = set(network.state_dict())
    state: dict[str, torch.Tensor] = {}
    quantized = {name for name, module in network.named_modules() if isinstance(module, _quantized_linear_types())}
    for name, param in network.named_parameters():
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if owner in quantized and name.endswith(".weight"):
            weight = dequantize_module_weight(network.get_submodule(owner))
            state[name] = weight.detach().to("cpu", dtype)
        else:
            state[name] = param.detach().to("cpu", dtype if param.is_floating_point() else param.dtype)
    for name, buffer in network.named_buffers():
        if name in persistent:
            state[name] = buffer.detach().to("cpu")
    return state
