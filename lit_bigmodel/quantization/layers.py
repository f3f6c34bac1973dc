"""Which layers a network quantizes, and the three operations on them: quantize, fake-quantize, convert.

The targets are the ``nn.Linear`` layers (what torchao and ``transformers``' ``TorchAoConfig`` quantize),
except the output layer (the LM head, or a classifier's last layer: what ``transformers`` keeps in
float by default), a layer whose weight is shared with another module (tied weights), the model's
``_keep_in_fp32_modules``, and, for grouped schemes, a layer whose input size the group size does not
divide. GPT-2-style ``Conv1D`` layers are not ``nn.Linear``: a network made of them has nothing to
quantize, which is an error naming them.

Example::

    from lit_bigmodel.quantization.layers import quantize_network, quantized_layers

    targets = quantize_network(model, "int8_weight_only")   # in place; the names it quantized
    assert quantized_layers(model) == targets
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.quantization.schemes import effective_group_size, fake_quant_config, ptq_config

__all__ = [
    "Targets",
    "convert_fake_quantized",
    "fake_quantize",
    "fake_quantized_layers",
    "find_targets",
    "quantize_network",
    "quantized_layers",
    "weight_bytes",
]


@dataclass
class Targets:
    """The layers a scheme quantizes (``names``), and the ``nn.Linear`` layers left in float with the reason."""

    names: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def find_targets(
    network: nn.Module, scheme: str, group_size: int | None = None, *, trainable_only: bool = False
) -> Targets:
    """The ``nn.Linear`` layers of ``network`` that ``scheme`` quantizes (see the module docstring).

    ``trainable_only``: only layers whose weight requires grad (QAT: a frozen teacher is left alone).

    Raises:
        ConfigurationError: no layer to quantize (the message names what was found instead).
    """
    group = effective_group_size(scheme, group_size)
    owners: dict[int, list[str]] = {}
    for name, module in network.named_modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(name)
    output = _output_layer(network)
    keep_float = list(getattr(network, "_keep_in_fp32_modules", None) or [])
    targets = Targets()
    for name, module in network.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        reason = None
        if is_traceable_wrapper_subclass(weight) or not weight.is_floating_point():
            reason = "already quantized"
        elif module is output or name == output:
            reason = "output layer"
        elif len(owners.get(id(weight), [])) > 1:
            reason = "weight tied to " + ", ".join(n for n in owners[id(weight)] if n != name)
        elif any(_matches(name, pattern) for pattern in keep_float):
            reason = "kept in float32 by the model (_keep_in_fp32_modules)"
        elif group is not None and module.in_features % group:
            reason = f"input size {module.in_features} is not a multiple of group_size {group}"
        elif trainable_only and not weight.requires_grad:
            reason = "frozen (not trained)"
        if reason is None:
            targets.names.append(name)
        else:
            targets.skipped[name] = reason
    if not targets.names:
        conv1d = _conv1d_layers(network)
        if conv1d:
            raise ConfigurationError(
                f"nothing to quantize: the network's layers are GPT-2-style Conv1D ({conv1d[0]!r} and "
                f"{len(conv1d) - 1} more), which torchao and transformers' TorchAoConfig do not quantize (they "
                "quantize nn.Linear). Use a model with nn.Linear layers (Llama, Qwen2, Mistral, BERT, ...)."
            )
        found = "; ".join(f"{name}: {why}" for name, why in list(targets.skipped.items())[:4]) or "no nn.Linear layer"
        raise ConfigurationError(f"nothing to quantize for scheme {scheme!r}: {found}.")
    return targets


def quantize_network(network: nn.Module, scheme: str, group_size: int | None = None) -> list[str]:
    """Quantize the target layers of ``network`` in place with torchao; the names of the layers quantized.

    Also records the scheme in ``network.config.quantization_config`` (a ``transformers.TorchAoConfig``
    naming every ``nn.Linear`` left in float), so that `lit_bigmodel.quantization.save_quantized` writes a
    directory ``from_pretrained`` loads back quantized in the same layers.
    """
    from torchao.quantization import quantize_

    targets = find_targets(network, scheme, group_size)
    chosen = set(targets.names)
    quantize_(network, ptq_config(scheme, group_size), filter_fn=lambda module, name: name in chosen)
    _record_scheme(network, scheme, group_size, targets)
    return targets.names


def fake_quantize(
    network: nn.Module, scheme: str, group_size: int | None = None, *, trainable_only: bool = True
) -> list[str]:
    """Swap the target layers for torchao's fake-quantized ``nn.Linear`` (the same parameters); their names."""
    from torchao.quantization import quantize_

    targets = find_targets(network, scheme, group_size, trainable_only=trainable_only)
    chosen = set(targets.names)
    prepare, _ = fake_quant_config(scheme, group_size)
    quantize_(network, prepare, filter_fn=lambda module, name: name in chosen)
    return targets.names


def convert_fake_quantized(network: nn.Module, scheme: str, group_size: int | None = None) -> list[str]:
    """Turn every fake-quantized layer of ``network`` into a really quantized one (in place); their names.

    Each becomes an ``nn.Linear`` again, quantized with the scheme's torchao config, i.e. post-training
    quantization of the weights that QAT learnt. The scheme is recorded as by `quantize_network`.
    """
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    names = fake_quantized_layers(network)
    chosen = set(names)
    quantize_(network, QATConfig(step="convert"), filter_fn=lambda module, name: name in chosen)
    quantize_(network, ptq_config(scheme, group_size), filter_fn=lambda module, name: name in chosen)
    skipped = {
        name: "not fake-quantized in training"
        for name, module in network.named_modules()
        if isinstance(module, nn.Linear) and name not in chosen
    }
    _record_scheme(network, scheme, group_size, Targets(names, skipped))
    return names


def fake_quantized_layers(network: nn.Module) -> list[str]:
    """Names of the layers of ``network`` that torchao fake-quantizes."""
    if "torchao" not in __import__("sys").modules:
        return []
    from torchao.quantization.qat import FakeQuantizedLinear

    return [name for name, module in network.named_modules() if isinstance(module, FakeQuantizedLinear)]


def quantized_layers(network: nn.Module) -> list[str]:
    """Names of the layers of ``network`` whose weight is a quantized tensor (a torchao tensor subclass)."""
    from torch.distributed.tensor import DTensor

    return [
        name
        for name, module in network.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
        and is_traceable_wrapper_subclass(module.weight)
        and not isinstance(module.weight, DTensor)  # FSDP2 shards are tensor subclasses too, not quantized ones
    ]


def weight_bytes(network: nn.Module) -> int:
    """Bytes the parameters and buffers of ``network`` occupy in memory (a quantized weight: its inner tensors)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*network.parameters(), *network.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor)
    return total


def check_finite_quantized(state_dict: dict[str, Any]) -> None:
    """`lit_bigmodel.export.check_finite` for a state dict that may hold quantized tensors (checks their parts)."""
    from lit_bigmodel.export import check_finite

    flat: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for part, inner in _inner_tensors(name, tensor):
            flat[part] = inner
    check_finite(flat)


def _inner_tensors(name: str, tensor: Any) -> list[tuple[str, torch.Tensor]]:
    if not isinstance(tensor, torch.Tensor):
        return []
    if not is_traceable_wrapper_subclass(tensor):
        return [(name, tensor)]
    attributes, _ = tensor.__tensor_flatten__()  # type: ignore[attr-defined]
    found: list[tuple[str, torch.Tensor]] = []
    for attribute in attributes:
        found += _inner_tensors(f"{name}.{attribute}", getattr(tensor, attribute))
    return found


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return sum(inner.numel() * inner.element_size() for _, inner in _inner_tensors("", tensor))


def _conv1d_layers(network: nn.Module) -> list[str]:
    """The names of ``network``'s transformers ``Conv1D`` layers (GPT-2's projections), which torchao does not convert."""
    return [name for name, module in network.named_modules() if type(module).__name__ == "Conv1D"]


def _output_layer(network: nn.Module) -> nn.Module | str | None:
    """The layer ``transformers`` keeps in float by default: the output embeddings, else the last parameter's owner."""
    get_output = getattr(network, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if isinstance(output, nn.Module):
        return output
    if getattr(network, "config", None) is None:
        return None
    names = [name for name, _ in network.named_parameters()]
    return names[-1].rsplit(".", 1)[0] if names else None


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or name.startswith(pattern + ".") or f".{pattern}." in name


def _record_scheme(network: nn.Module, scheme: str, group_size: int | None, targets: Targets) -> None:
    import re

    config = getattr(network, "config", None)
    if config is None or not hasattr(network, "save_pretrained"):
        return
    from transformers import TorchAoConfig

    keep = [re.escape(name) for name in targets.skipped]
    config.quantization_config = TorchAoConfig(quant_type=ptq_config(scheme, group_size), modules_to_not_convert=keep)
