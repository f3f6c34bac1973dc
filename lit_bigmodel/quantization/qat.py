"""`QuantizationAware`: quantization-aware training (torchao QAT) for any Trainer, from a chosen step.

The network trains in float until ``start_step``; from then on its ``nn.Linear`` layers compute with
fake-quantized weights (and activations, for the dynamic schemes) through torchao's
``FakeQuantizedLinear``, so training learns weights that survive quantization; when fit ends the
layers are converted into really quantized ones (`lit_bigmodel.quantization.layers`).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_bigmodel._checks import check_number
from lit_bigmodel._sharding import is_sharded
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.quantization.layers import (
    convert_fake_quantized,
    fake_quantize,
    fake_quantized_layers,
    find_targets,
    quantized_layers,
)
from lit_bigmodel.quantization.schemes import check_scheme, require_torchao

__all__ = ["QuantizationAware"]


class QuantizationAware(Callback):
    """Train in float, then fake-quantize from ``start_step``, and convert to a quantized network when fit ends.

    What changes: at ``start_step`` (optimizer steps, ``trainer.global_step``; a float in [0, 1] is a
    fraction of ``trainer.estimated_stepping_batches``) the target layers of the network (its
    ``nn.Linear`` layers whose weight trains, except the output layer and tied weights: see
    `lit_bigmodel.quantization.layers.find_targets`) become torchao ``FakeQuantizedLinear`` layers
    holding the same parameters, so the optimizer and its state carry on. Every forward from then on
    rounds the weights as ``scheme`` will. At the end of fit (``on_fit_end``) they are converted:
    quantized with the scheme's torchao config (tensor subclasses: int8 values and scales), ready for
    `lit_bigmodel.quantization.export_quantized`. A run that ends before ``start_step`` is converted all
    the same, which is then post-training quantization (said with a warning).

    Which network: the LightningModule's attribute ``network`` (``"model"``: the network of `SFTModule`,
    the student of `DistillationModule`, whose teacher stays in full precision); None: the whole
    LightningModule. Only trainable layers are fake-quantized, so frozen parts stay float.

    Resume: the callback's state (the resolved start step, whether fake quantization is on) is in the
    checkpoint; fake-quantized layers have no state of their own, so a resumed run rebuilds them before
    its first step and continues exactly (tested: bit-identical weights against an uninterrupted run).

    Strategies: one device and DDP. FSDP, FSDP2 and DeepSpeed are refused in ``setup`` (layers are
    swapped and converted whole on each rank, which sharded parameters do not allow). Modules with
    ``peft`` adapters are refused: their base is frozen, so there would be nothing to fake-quantize that
    the merged export keeps; quantize the merged export instead. `Pruning` works alongside: pruned
    zeros stay zeros through conversion.

    Args:
        scheme: a scheme with QAT (`lit_bigmodel.quantization.SCHEMES`): ``"int8_weight_only"``,
            ``"int8_dynamic_intx8"``, ``"int8_dynamic_intx4"`` or ``"intx4_weight_only"``.
        start_step: optimizer step at which fake quantization starts (int >= 0), or a fraction of the run.
        group_size: weights per scale for the grouped schemes (default: the scheme's, 32).
        convert_at_end: convert the network to a quantized one in ``on_fit_end``.
        network: the LightningModule's attribute holding the network (None: the module itself).

    Raises:
        ConfigurationError: invalid arguments (all in one message); in ``setup`` a sharded strategy, a
            module with ``peft`` adapters or a device the scheme does not run on; in ``on_fit_start`` a
            network with nothing to quantize or one converted already.

    Example::

        import lightning as L
        from transformers import LlamaConfig
        from lit_bigmodel import SFTModule
        from lit_bigmodel.datamodules import ArithmeticDataModule
        from lit_bigmodel.quantization import QuantizationAware, export_quantized

        qat = QuantizationAware("intx4_weight_only", start_step=0.8)   # float for 80% of the run, then QAT
        module = SFTModule(LlamaConfig(num_hidden_layers=2, hidden_size=128, num_attention_heads=4), learning_rate=2e-3)
        L.Trainer(max_steps=1000, callbacks=[qat]).fit(module, ArithmeticDataModule())
        export_quantized(module, "out/adder-int4")   # transformers loads it back quantized
    """

    def __init__(
        self,
        scheme: str = "intx4_weight_only",
        start_step: int | float = 0,
        group_size: int | None = None,
        convert_at_end: bool = True,
        network: str | None = "model",
    ) -> None:
        problems = [p for p in (check_scheme(scheme, qat=True, group_size=group_size),) if p is not None]
        if isinstance(start_step, float):
            if check_number("start_step", start_step, low=0.0, high=1.0) is not None:
                problems.append(
                    f"`start_step` must be an int >= 0 (optimizer steps) or a float in [0, 1] (fraction of the run), got {start_step!r}."
                )
        elif check_number("start_step", start_step, low=0, integer=True) is not None:
            problems.append(
                f"`start_step` must be an int >= 0 (optimizer steps) or a float in [0, 1] (fraction of the run), got {start_step!r}."
            )
        if network is not None and not (isinstance(network, str) and network.isidentifier()):
            problems.append(f"`network` must be an attribute name of the LightningModule or None, got {network!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        require_torchao()
        self.scheme = scheme
        self.start_step = start_step
        self.group_size = group_size
        self.convert_at_end = convert_at_end
        self.network_attribute = network
        self.layers: list[str] = []  # the fake-quantized (then quantized) layers
        self._start: int | None = None  # the resolved start step
        self._prepared = False
        self._converted = False
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(scheme=self.scheme, group_size=self.group_size, network=self.network_attribute)

    @property
    def fake_quantizing(self) -> bool:
        """Whether the network computes with fake-quantized layers now."""
        return self._prepared and not self._converted

    # ------------------------------------------------------------------ Trainer hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if is_sharded(trainer):
            raise ConfigurationError(
                f"QuantizationAware does not support {type(trainer.strategy).__name__}: it swaps and converts whole "
                "layers on each rank, and this strategy holds only shards of them. Use one device or strategy='ddp'."
            )
        peft = getattr(pl_module, "peft", None)
        if peft is not None:
            raise ConfigurationError(
                f"QuantizationAware: `peft` must be None, got {type(peft).__name__}: the adapted base is frozen, so the "
                "merged weights would not be the ones trained quantized. Export the merged model, then fine-tune "
                "SFTModule(dir) with QuantizationAware and no `peft`."
            )
        root = getattr(trainer.strategy, "root_device", None)
        if root is not None and (problem := check_scheme(self.scheme, root, qat=True)) is not None:
            raise ConfigurationError(f"QuantizationAware: {problem}")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        network = self._network(pl_module)
        adapted = _adapter_layers(network)
        if adapted:
            raise ConfigurationError(
                f"QuantizationAware: the network has peft adapter layers ({adapted[0]!r}, ...): quantize the merged "
                "export instead."
            )
        if quantized_layers(network):
            raise ConfigurationError(
                "QuantizationAware: the network is quantized already (converted at the end of an earlier fit); "
                "a quantized network does not train. Start from the float model."
            )
        state = self._pending or {}
        self._pending = None
        self._start = state.get("start")
        if self._start is None:
            self._start = self._resolve_start(trainer)
        if not fake_quantized_layers(network):
            find_targets(network, self.scheme, self.group_size, trainable_only=True)  # an error now, not at start
        if state.get("prepared", False) or trainer.global_step >= self._start:
            self._prepare(network, trainer.global_step)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        assert self._start is not None  # resolved in on_fit_start
        if not self._prepared and trainer.global_step >= self._start:
            self._prepare(self._network(pl_module), trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.convert_at_end or self._converted:
            return
        network = self._network(pl_module)
        if not self._prepared:
            rank_zero_warn(
                f"QuantizationAware: fit ended at step {trainer.global_step}, before `start_step` ({self._start}); "
                "the network is converted without having trained quantized (post-training quantization)."
            )
            self._prepare(network, trainer.global_step)
        self.convert(network)

    # ------------------------------------------------------------------ public
    def convert(self, network: nn.Module) -> list[str]:
        """Turn the fake-quantized layers of ``network`` into quantized ones (`on_fit_end` does it); their names."""
        with torch.random.fork_rng(devices=[]):  # torchao builds each new nn.Linear with a random init first
            self.layers = convert_fake_quantized(network, self.scheme, self.group_size)
        self._converted = True
        rank_zero_info(f"QuantizationAware: converted {len(self.layers)} layers to {self.scheme}.")
        return self.layers

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"start": self._start, "prepared": self._prepared, "converted": self._converted, "scheme": self.scheme}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)  # applied in on_fit_start, once the network is built and loaded

    # ------------------------------------------------------------------ internals
    def _prepare(self, network: nn.Module, step: int) -> None:
        with torch.random.fork_rng(devices=[]):  # FakeQuantizedLinear draws a random init before taking the weights
            self.layers = fake_quantize(network, self.scheme, self.group_size, trainable_only=True)
        self._prepared = True
        rank_zero_info(
            f"QuantizationAware: fake-quantizing {len(self.layers)} layers as {self.scheme} from step {step}."
        )

    def _network(self, pl_module: L.LightningModule) -> nn.Module:
        if self.network_attribute is None:
            return pl_module
        network = getattr(pl_module, self.network_attribute, None)
        if not isinstance(network, nn.Module):
            raise ConfigurationError(
                f"QuantizationAware: the LightningModule has no network at `{self.network_attribute}` (got "
                f"{type(network).__name__}); pass network=<attribute> or network=None (the whole module)."
            )
        return getattr(network, "_orig_mod", network)

    def _resolve_start(self, trainer: L.Trainer) -> int:
        if isinstance(self.start_step, int):
            return self.start_step
        total = trainer.estimated_stepping_batches
        if total == float("inf"):
            raise ConfigurationError(
                f"`start_step`={self.start_step!r} is a fraction of the run, but the run has no length; set `max_steps`."
            )
        return round(self.start_step * total)


def _adapter_layers(module: nn.Module) -> list[str]:
    """Names of the peft adapter layers in ``module``; none when peft was never imported."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)]
