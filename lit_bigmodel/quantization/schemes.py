"""The quantization schemes: which torchao config each name stands for, where it runs, and how QAT simulates it.

Every scheme quantizes the weights of ``nn.Linear`` layers (see `lit_bigmodel.quantization.layers`) with
torchao; nothing here computes a quantized number itself.

| scheme | weights | activations | runs on | QAT |
|---|---|---|---|---|
| ``int8_weight_only`` | int8, per output channel | float | CPU, CUDA | yes |
| ``int8_dynamic`` | int8, per output channel | int8, per token, symmetric | CPU, CUDA | no (use ``int8_dynamic_intx8``) |
| ``int8_dynamic_intx8`` | int8, per output channel | int8, per token, asymmetric | CPU, CUDA | yes |
| ``int8_dynamic_intx4`` | int4, groups of ``group_size`` (32) | int8, per token, asymmetric | CPU, CUDA | yes |
| ``intx4_weight_only`` | int4, groups of ``group_size`` (32) | float | CPU, CUDA | yes |
| ``int4_weight_only`` | int4 packed, groups of ``group_size`` (128), bfloat16 | bfloat16 | CUDA, compute capability >= 8.0 | no |

The ``intx`` schemes store each 4-bit value in an int8 (torchao's ``unpacked_to_int8`` layout, the one
its QAT converts to), so their files are as large as int8's; ``int4_weight_only`` packs two values a
byte and needs CUDA (torchao's tinygemm kernel).

Example::

    from lit_bigmodel.quantization.schemes import check_scheme, ptq_config

    problem = check_scheme("intx4_weight_only", torch.device("cpu"))   # None: it runs here
    config = ptq_config("intx4_weight_only", group_size=32)           # an IntxWeightOnlyConfig
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SCHEMES", "Scheme", "check_scheme", "fake_quant_config", "ptq_config", "require_torchao"]


@dataclass(frozen=True)
class Scheme:
    """One quantization scheme (see the module's table)."""

    name: str
    """What the CLI's ``--scheme`` and the Python functions take."""
    summary: str
    """One line for help texts."""
    weight_bits: int
    """Bits of information per quantized weight (int4 values may be stored in int8)."""
    devices: tuple[str, ...]
    """Device types whose kernels run it."""
    qat: bool
    """Whether `QuantizationAware` can train for it (torchao fake-quantizes it exactly)."""
    group_size: int | None = None
    """Default weights per scale (None: one scale per output channel)."""
    dtype: torch.dtype | None = None
    """The weights' dtype the kernel needs (None: the model's own)."""
    min_capability: tuple[int, int] | None = None
    """The lowest CUDA compute capability it runs on."""


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme("int8_weight_only", "int8 weights per channel, float activations", 8, ("cpu", "cuda"), True),
        Scheme("int8_dynamic", "int8 weights per channel, int8 activations per token", 8, ("cpu", "cuda"), False),
        Scheme("int8_dynamic_intx8", "int8 weights per channel, asymmetric int8 activations", 8, ("cpu", "cuda"), True),
        Scheme(
            "int8_dynamic_intx4", "int4 weights in groups, asymmetric int8 activations", 4, ("cpu", "cuda"), True, 32
        ),
        Scheme(
            "intx4_weight_only",
            "int4 weights in groups (stored in int8), float activations",
            4,
            ("cpu", "cuda"),
            True,
            32,
        ),
        Scheme(
            "int4_weight_only",
            "int4 weights in groups, packed, bfloat16 activations (CUDA)",
            4,
            ("cuda",),
            False,
            128,
            torch.bfloat16,
            (8, 0),
        ),
    )
}

_NO_QAT = {
    "int8_dynamic": "torchao cannot fake-quantize its symmetric per-token activations; train for "
    "'int8_dynamic_intx8' (int8 weights, asymmetric int8 activations) instead",
    "int4_weight_only": "torchao's int4 fake quantizer simulates its mslk 'plain' int4 layout, not the packed CUDA "
    "kernel's; train for 'intx4_weight_only' (the same int4 groups, on any device) instead",
}


def require_torchao() -> None:
    """Raise ``ImportError`` with the install line when torchao is missing."""
    if importlib.util.find_spec("torchao") is None:
        raise ImportError("quantization needs torchao: pip install 'lit-bigmodel[quantization]' (torchao>=0.18).")


def check_scheme(
    name: Any, device: torch.device | str | None = None, *, qat: bool = False, group_size: int | None = None
) -> str | None:
    """The sentence saying why scheme ``name`` cannot be used on ``device`` (and for QAT), or None when it can.

    ``device`` None skips the device check. ``group_size`` must divide nothing here (layers are checked
    when targets are chosen), but must be a positive power of two for grouped schemes and None otherwise.

    Example::

        if (problem := check_scheme("int4_weight_only", "cpu")) is not None:
            raise ConfigurationError(problem)
    """
    if name not in SCHEMES:
        return f"`scheme` must be one of {tuple(SCHEMES)}, got {name!r}."
    scheme = SCHEMES[name]
    if qat and not scheme.qat:
        return f"`scheme` {name!r} has no quantization-aware training: {_NO_QAT[name]}."
    if group_size is not None:
        if scheme.group_size is None:
            return f"`group_size` is only for grouped schemes ({_grouped()}); scheme {name!r} has one scale per channel, got {group_size!r}."
        if (
            isinstance(group_size, bool)
            or not isinstance(group_size, int)
            or group_size < 1
            or group_size & (group_size - 1)
        ):
            return f"`group_size` must be a power of two (32, 64, 128, ...), got {group_size!r}."
    if device is None:
        return None
    device = torch.device(device)
    if device.type not in scheme.devices:
        where = " or ".join(d.upper() for d in scheme.devices)
        others = [s.name for s in SCHEMES.values() if device.type in s.devices and s.weight_bits == scheme.weight_bits]
        instead = f"; on {device.type.upper()} use one of {tuple(others)}" if others else ""
        return f"scheme {name!r} needs {where}, and the device is {device.type.upper()}{instead}."
    if scheme.min_capability is not None and device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < scheme.min_capability:
            need = ".".join(map(str, scheme.min_capability))
            return f"scheme {name!r} needs a GPU of compute capability >= {need}, this one has {capability[0]}.{capability[1]}."
    return None


def ptq_config(name: str, group_size: int | None = None) -> Any:
    """The torchao config (an ``AOBaseConfig``) that quantizes a layer for scheme ``name``."""
    require_torchao()
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8DynamicActivationIntxWeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
        PerAxis,
        PerGroup,
    )

    group = group_size or SCHEMES[name].group_size
    int4 = getattr(torch, "int4")  # noqa: B009 (a dtype the type stubs lack)
    if name == "int8_weight_only":
        return Int8WeightOnlyConfig()
    if name == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    if name == "int8_dynamic_intx8":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    if name == "int8_dynamic_intx4":
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=int4, weight_granularity=PerGroup(group))
    if name == "intx4_weight_only":
        return IntxWeightOnlyConfig(weight_dtype=int4, granularity=PerGroup(group))
    if name == "int4_weight_only":
        return Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d")
    raise ValueError(f"unknown scheme {name!r}")


def fake_quant_config(name: str, group_size: int | None = None) -> tuple[Any, Any]:
    """The torchao ``QATConfig`` that fake-quantizes a layer for scheme ``name``, and the config that converts it.

    Converting swaps each fake-quantized layer back to ``nn.Linear`` and quantizes it with `ptq_config`,
    so a converted layer equals post-training quantization of the weights QAT learnt.
    """
    require_torchao()
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    base = ptq_config(name, group_size)
    if name == "int8_weight_only":  # torchao infers no fake quantizer from Int8WeightOnlyConfig: state it
        weights = IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True)
        return QATConfig(weight_config=weights, step="prepare"), base
    return QATConfig(base, step="prepare"), base


def effective_group_size(name: str, group_size: int | None) -> int | None:
    """The group size scheme ``name`` quantizes with (None: per channel)."""
    return group_size or SCHEMES[name].group_size


def _grouped() -> str:
    return ", ".join(repr(s.name) for s in SCHEMES.values() if s.group_size is not None)
