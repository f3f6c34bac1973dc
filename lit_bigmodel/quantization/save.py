"""Write a quantized network as a directory that ``transformers`` loads back quantized.

The weights go to ``model.safetensors`` in torchao's flattened form (each quantized tensor as its parts
plus metadata), and ``config.json`` carries a ``TorchAoConfig`` naming the layers left in float, so
``AutoModelFor...from_pretrained(dir)`` rebuilds the same torchao tensors in the same layers (tested:
same logits as the network in memory). Like every export of the package, the directory is written
beside the target and renamed into place.

Example::

    from lit_bigmodel.quantization import quantize_network, save_quantized

    quantize_network(model, "int8_weight_only")
    save_quantized(model, "out/int8", tokenizer)
    AutoModelForCausalLM.from_pretrained("out/int8")   # Int8Tensor weights again
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from lit_bigmodel._sharding import is_sharded
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.export import check_target, write_staged
from lit_bigmodel.quantization.layers import check_finite_quantized, fake_quantized_layers, quantized_layers

__all__ = ["export_quantized", "save_quantized"]


def save_quantized(
    network: Any, dirpath: str | os.PathLike[str], tokenizer: Any = None, *, overwrite: bool = False
) -> str:
    """Write ``network`` (quantized by `quantize_network` or `QuantizationAware`) and ``tokenizer`` to ``dirpath``.

    Raises:
        OutputExistsError: ``dirpath`` is a file, or a non-empty directory and not ``overwrite``.
        ConfigurationError: ``network`` is not a quantized Hugging Face model (still fake-quantized, not
            quantized, or quantized without a recorded scheme), or holds NaN / inf.
    """
    target = check_target(dirpath, overwrite)
    network = getattr(network, "_orig_mod", network)
    if not hasattr(network, "save_pretrained"):
        raise ConfigurationError(
            f"`network` must be a Hugging Face model (save_pretrained) to be written, got {type(network).__name__}."
        )
    if fake_quantized_layers(network):
        raise ConfigurationError(
            "the network is still fake-quantized (QAT): convert it first (QuantizationAware converts at the end of "
            "fit; or `convert_fake_quantized(network, scheme)`)."
        )
    if not quantized_layers(network) or getattr(network.config, "quantization_config", None) is None:
        raise ConfigurationError(
            "the network is not quantized: quantize it with `quantize_network(network, scheme)` (or train it with "
            "the QuantizationAware callback), or write a float model with `save_pretrained`."
        )
    check_finite_quantized(network.state_dict())

    def save(staging: str) -> None:
        with _serializing(network):
            network.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)

    return write_staged(target, save)


def export_quantized(module: Any, dirpath: str | os.PathLike[str], *, overwrite: bool = False) -> str:
    """`save_quantized` for the network of an `SFTModule` or `DistillationModule` (its student), with its tokenizer.

    Only global rank zero writes (under DDP every rank may call it).

    Raises:
        ConfigurationError: the module has ``peft`` adapters (quantize the merged export instead), runs
            under a sharded strategy, or its network is not quantized.

    Example::

        trainer.fit(module, dm)                  # with QuantizationAware(...): converted at the end of fit
        export_quantized(module, "out/qat-int4")
    """
    if getattr(module, "adapters", None) is not None or getattr(module, "peft", None) is not None:
        raise ConfigurationError(
            "export_quantized: the module has `peft` adapters. Export the merged model (`module.export(dir)`), then "
            "quantize that directory: `lit-bigmodel quantize DIR OUT --scheme ...`."
        )
    trainer = getattr(module, "_trainer", None)
    if trainer is not None and is_sharded(trainer):
        raise ConfigurationError(
            f"export_quantized: {type(trainer.strategy).__name__} shards the weights; quantized layers exist only on "
            "one device or under DDP."
        )
    target = check_target(dirpath, overwrite)
    if trainer is not None and not trainer.is_global_zero:
        return target
    network = getattr(module, "model", None)
    if network is None:
        raise ConfigurationError("nothing to export: the module has no network (`model`) yet.")
    return save_quantized(network, target, getattr(module, "tokenizer", None), overwrite=overwrite)


@contextlib.contextmanager
def _serializing(network: Any) -> Iterator[None]:
    """Give ``network`` the ``transformers`` quantizer that flattens torchao tensors for safetensors, while saving."""
    from transformers.quantizers import AutoHfQuantizer

    had = getattr(network, "hf_quantizer", None)
    network.hf_quantizer = AutoHfQuantizer.from_config(network.config.quantization_config, pre_quantized=True)
    try:
        yield
    finally:
        network.hf_quantizer = had
