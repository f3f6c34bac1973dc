"""`GraphedUpdate`: one training update — forward, backward, optimizer step — captured once as a CUDA graph.

A small network's update is a few dozen short kernels; launched one by one from Python, the GPU
waits on the launches (SeqGAN's discriminator: ~986,000 updates of 64 rows in the paper's run).
Replaying a captured graph launches them all at once. The captured update reads its inputs from
static buffers, so each call copies the batch in, replays, and returns the static outputs.

What capture needs, and what this class does about it:

- warm-up iterations before capture (cuBLAS handles, the optimizer's state): they run on the real
  parameters, so the parameters, the optimizer's state and the CUDA random state are saved before
  and put back after — the first replayed update starts from where the caller was (module buffers,
  e.g. BatchNorm's running statistics, are not put back; SeqGAN's networks have none);
- a capturable optimizer: ``capturable=True`` is set on its parameter groups (Adam and AdamW only:
  their fresh state is zeros, the state the warm-up puts back);
- fixed shapes: the first call's shapes are captured; a later call whose inputs differ in shape
  or dtype runs eagerly (e.g. the last, smaller batch of an epoch), on the same parameters and
  optimizer — so make the first call a full-size one (or call ``eager`` for the odd ones);
- a graph bakes in the optimizer's settings (the learning rate among them), the addresses of its
  state, the modules' train/eval modes and the TF32 flags: when one changes (a scheduler, a
  checkpoint loaded into the optimizer), the update is captured again. Other Python state that
  ``loss_fn`` reads is baked in too and not watched.

Without CUDA (or with ``enabled=False``) the same calls run eagerly, so code that uses it can be
tested on a CPU.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]


class GraphedUpdate:
    """``update(*inputs)``: zero the gradients, ``loss_fn(*inputs)``, backward, ``optimizer.step()``.

    ``loss_fn`` returns the loss to minimise, or a tuple ``(loss, *aux)`` of tensors (detached
    statistics, e.g. accuracy). The call returns the tuple ``(loss, *aux)`` detached; under a
    graph these are static tensors that the next call overwrites — read or accumulate them first.

    Args:
        loss_fn: computes the loss from the inputs with the network being trained.
        optimizer: a `torch.optim.Adam` or `torch.optim.AdamW` over that network's parameters
            (``fused=True`` launches fewest kernels).
        module: the network; its modules' train/eval modes join what triggers a new capture.
        enabled: capture on CUDA; ``False`` always runs eagerly. A capture that fails puts the
            parameters, optimizer state and random state back, sets ``enabled=False`` and re-raises.
        warmup: eager iterations before capture (their effects are undone).

    Example::

        D = CNNDiscriminator(5000).cuda()
        optimizer = torch.optim.Adam(D.parameters(), lr=1e-4, fused=True)
        update = GraphedUpdate(lambda x, y: F.cross_entropy(D(x), y), optimizer)
        for tokens, labels in batches:       # (64, 20), (64,) on the GPU
            loss, = update(tokens, labels)   # captured on the first call, replayed after
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        module: nn.Module | None = None,
        enabled: bool = True,
        warmup: int = 3,
    ) -> None:
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
            raise ValueError(
                f"`optimizer` must be a torch.optim.Adam or AdamW (its fresh state is zeros, which a capture's warm-up "
                f"can put back), got {type(optimizer).__name__}."
            )
        if warmup < 1:
            raise ValueError(f"`warmup` must be >= 1, got {warmup!r}.")
        self.loss_fn, self.optimizer, self.module = loss_fn, optimizer, module
        self.enabled, self.warmup = enabled, warmup
        self.captures = 0  # how many times the update was captured (a test and a benchmark read it)
        self._graph: Any = None
        self._signature: tuple[Any, ...] | None = None
        self._fingerprint: tuple[Any, ...] | None = None
        self._static_inputs: tuple[torch.Tensor, ...] = ()
        self._static_outputs: tuple[torch.Tensor, ...] = ()

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self._graphable(inputs):
            return self.eager(*inputs)
        signature = tuple((x.shape, x.dtype, x.device) for x in inputs)
        if self._graph is not None and self._signature != signature:
            return self.eager(*inputs)  # another shape: the captured one stays for the common case
        if self._graph is None or self._fingerprint != self._state_fingerprint():
            self._capture(inputs)
            self._signature = signature
        for static, x in zip(self._static_inputs, inputs):
            static.copy_(x)
        self._graph.replay()
        return self._static_outputs

    def eager(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same update without a graph."""
        self.optimizer.zero_grad(set_to_none=True)
        outputs = _as_tuple(self.loss_fn(*inputs))
        outputs[0].backward()
        self.optimizer.step()
        return tuple(x.detach() for x in outputs)

    def _graphable(self, inputs: Sequence[torch.Tensor]) -> bool:
        return (
            self.enabled
            and torch.cuda.is_available()
            and all(x.is_cuda for x in inputs)
            and all(p.is_cuda for p in self.params)
        )

    def _state_fingerprint(self) -> tuple[Any, ...]:
        """What a graph bakes in: the optimizer's settings, every tensor's address, the modules' modes, TF32."""
        state = self.optimizer.state
        groups = tuple(
            (
                tuple((k, _frozen(v)) for k, v in sorted(group.items()) if k != "params"),
                *((p.data_ptr(), *(_frozen(v) for v in state.get(p, {}).values())) for p in group["params"]),
            )
            for group in self.optimizer.param_groups
        )
        modes = tuple(m.training for m in self.module.modules()) if self.module is not None else ()
        return groups, modes, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def _capture(self, inputs: Sequence[torch.Tensor]) -> None:
        device = self.params[0].device
        with torch.cuda.device(device):
            capturable = [group.get("capturable", False) for group in self.optimizer.param_groups]
            for group in self.optimizer.param_groups:
                group["capturable"] = True
            for p in self.params:  # a state made before capturable=True keeps its step count on the CPU
                state = self.optimizer.state.get(p, {})
                if "step" in state and state["step"].device != p.device:
                    state["step"] = state["step"].to(p.device)
            params = [p.detach().clone() for p in self.params]
            fresh = [p for p in self.params if not self.optimizer.state.get(p)]
            saved_state = {p: {k: v.clone() for k, v in s.items()} for p, s in self.optimizer.state.items()}
            rng = torch.cuda.get_rng_state()
            self._static_inputs = tuple(x.detach().clone() for x in inputs)
            captured = False
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    for _ in range(self.warmup):
                        self.eager(*self._static_inputs)
                torch.cuda.current_stream().wait_stream(side)

                graph = torch.cuda.CUDAGraph()
                self.optimizer.zero_grad(set_to_none=True)
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    outputs = _as_tuple(self.loss_fn(*self._static_inputs))
                    outputs[0].backward()
                    self.optimizer.step()
                captured = True
            finally:  # undo the warm-up: parameters, optimizer state (in place: a graph holds them), RNG
                with torch.no_grad():
                    for p, before in zip(self.params, params):
                        p.copy_(before)
                    for p in fresh:
                        if captured:
                            for value in self.optimizer.state[p].values():
                                value.zero_()
                        else:
                            self.optimizer.state.pop(p, None)
                    for p, values in saved_state.items():
                        for key, value in values.items():
                            self.optimizer.state[p][key].copy_(value)
                torch.cuda.set_rng_state(rng)
                if not captured:  # as before the attempt; the caller sees the error
                    self.enabled, self._graph = False, None
                    for group, flag in zip(self.optimizer.param_groups, capturable):
                        group["capturable"] = flag
        self._static_outputs = tuple(x.detach() for x in outputs)
        self._graph = graph
        self._fingerprint = self._state_fingerprint()
        self.captures += 1
        if self.captures == 5:
            warnings.warn(
                "GraphedUpdate captured its update 5 times: something it bakes in keeps changing (a learning-rate "
                "schedule? give the optimizer a Tensor lr), and each capture costs a few eager updates.",
                stacklevel=3,
            )


def _frozen(value: Any) -> Any:
    """A comparable stand-in: tensors by address (a graph reads them there), lists as tuples."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.data_ptr())
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)
