"""The pieces behind `Pruning`: which weights to prune, how masks are chosen, and how they are stored.

Masks are boolean tensors shaped like the weight (True = kept). Every method works on a weight seen
in the ``(out_features, in_features)`` layout of ``nn.Linear``; Hugging Face ``Conv1D`` stores its
weight as ``(in, out)`` and is transposed (a view) first. Choosing "the k smallest scores" is exact
(ties are broken by position), also across many tensors on different devices, by bisection on the
bit patterns of non-negative float32 scores, whose integer order is their numeric order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from lit_bigmodel.errors import ConfigurationError

Method = Literal["unstructured", "structured", "heads", "n:m"]
METHODS = ("unstructured", "structured", "heads", "n:m")
_INF_BITS = 0x7F800000  # float32 +inf as int32: larger than the bits of every finite non-negative float


def _conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency, but keep the callback usable without it
        return None
    return Conv1D


def is_prunable_layer(module: nn.Module) -> bool:
    """``nn.Linear`` (and subclasses) or Hugging Face ``Conv1D``, with a 2-d weight parameter."""
    conv1d = _conv1d_type()
    weight = getattr(module, "weight", None)
    kinds: tuple[type[nn.Module], ...] = (nn.Linear, conv1d) if conv1d is not None else (nn.Linear,)
    return isinstance(module, kinds) and isinstance(weight, nn.Parameter) and weight.ndim == 2


def is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


@dataclass
class Target:
    """One weight to prune: its parameter name (the key of its mask), module name and layout."""

    name: str
    module_name: str
    weight: nn.Parameter
    transposed: bool  # Conv1D: the weight is (in, out)

    def out_in(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (shaped like the weight) seen as ``(out_features, in_features)``; a view."""
        return tensor.t() if self.transposed else tensor


@dataclass
class HeadLayer:
    """The slices of one attention layer's weights that belong to each head.

    ``parts`` holds ``(parameter name, axis, offset)``: head ``h`` owns indices
    ``offset + h * head_dim ... offset + (h + 1) * head_dim`` along ``axis`` of the weight in the
    ``(out, in)`` layout (axis 0: query / key / value output rows; axis 1: output-projection input columns).
    """

    module_name: str
    num_heads: int
    head_dim: int
    parts: list[tuple[str, int, int]] = field(default_factory=list)


def _match(patterns: Sequence[str], name: str) -> bool:
    return any(re.search(pattern, name) for pattern in patterns)


def _filter_by_patterns(
    names: list[str], include: Sequence[str], exclude: Sequence[str], kind: str, problems: list[str]
) -> list[str]:
    """The names kept by ``include`` / ``exclude``; a pattern that matches none of ``names`` is a problem."""
    example = ", ".join(repr(n) for n in names[:4]) + (", ..." if len(names) > 4 else "")
    for argument, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns:
            if not any(re.search(pattern, name) for name in names):
                problems.append(
                    f"`{argument}` pattern {pattern!r} matches no {kind} module name (they look like: {example or 'none'})."
                )
    return [n for n in names if (not include or _match(include, n)) and not _match(exclude, n)]


def find_targets(
    root: nn.Module,
    method: Method,
    include: Sequence[str],
    exclude: Sequence[str],
    prune_embeddings: bool,
) -> tuple[list[Target], list[HeadLayer], list[str]]:
    """The weights to prune in ``root``, the attention layers (for ``"heads"``) and the problems found.

    Linear / Conv1D layers by default, embeddings when asked, never norms or biases. A tensor shared
    by several modules (GPT-2's ``lm_head`` and ``wte``) is one target. A layer whose weight is tied
    to an embedding is skipped unless ``prune_embeddings`` (its zeros would otherwise prune the embedding).
    """
    problems: list[str] = []
    if method == "heads":
        heads = find_head_layers(root)
        kept = set(_filter_by_patterns([h.module_name for h in heads], include, exclude, "attention", problems))
        heads = [h for h in heads if h.module_name in kept]
        if not heads and not problems:
            problems.append(
                "found no attention layer whose heads it knows how to prune (GPT-2 `c_attn`/`c_proj`, "
                "BERT `query`/`key`/`value` + `output.dense`, or `q_proj`/`k_proj`/`v_proj` + `o_proj`)."
            )
        params = dict(root.named_parameters(remove_duplicate=False))
        names = sorted({part[0] for layer in heads for part in layer.parts}, key=list(params).index)
        modules = dict(root.named_modules())
        targets = []
        for name in names:
            module_name = name.rpartition(".")[0]
            targets.append(Target(name, module_name, params[name], is_conv1d(modules[module_name])))
        return targets, heads, problems

    embedding_ids = {id(m.weight) for m in root.modules() if isinstance(m, nn.Embedding)}
    candidates: dict[str, nn.Module] = {}
    for module_name, module in root.named_modules():
        if is_prunable_layer(module):
            if id(module.weight) in embedding_ids and not prune_embeddings:
                continue  # a head tied to an embedding: pruning it would prune the embedding
            candidates[module_name] = module
        elif isinstance(module, nn.Embedding) and prune_embeddings:
            candidates[module_name] = module
    kept_names = _filter_by_patterns(list(candidates), include, exclude, "Linear / Conv1D / Embedding", problems)
    targets, seen = [], set()
    for module_name in kept_names:
        module = candidates[module_name]
        weight = module.weight
        assert isinstance(weight, nn.Parameter)
        if id(weight) in seen:
            continue  # tied: the shared tensor is pruned once, under its first name
        seen.add(id(weight))
        name = f"{module_name}.weight" if module_name else "weight"
        targets.append(Target(name, module_name, weight, is_conv1d(module)))
    if not targets and not problems:
        problems.append("found no Linear / Conv1D layer to prune (check `include` / `exclude`).")
    return targets, [], problems


def find_head_layers(root: nn.Module) -> list[HeadLayer]:
    """Attention layers of Hugging Face models, with the slices of each head (mask-based head pruning).

    Known layouts: GPT-2 (fused ``c_attn`` Conv1D + ``c_proj``), BERT-like (``self.query/key/value`` +
    ``output.dense``) and the ``q_proj/k_proj/v_proj`` + ``o_proj`` / ``out_proj`` / ``dense`` family
    (Llama, Mistral, Qwen, OPT, BART, ...). With grouped-query attention (fewer key / value heads than
    query heads) only the query rows and output columns of a head are pruned: key / value heads are shared.
    """
    layers = []
    for name, module in root.named_modules():
        prefix = f"{name}." if name else ""
        c_attn, c_proj = getattr(module, "c_attn", None), getattr(module, "c_proj", None)
        num_heads, head_dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
        self_attention, output = getattr(module, "self", None), getattr(module, "output", None)
        q_proj, k_proj, v_proj = (getattr(module, f"{x}_proj", None) for x in "qkv")
        o_proj = next((getattr(module, n) for n in ("o_proj", "out_proj", "dense") if hasattr(module, n)), None)
        if (
            c_attn is not None
            and c_proj is not None
            and isinstance(num_heads, int)
            and isinstance(head_dim, int)
            and not getattr(module, "is_cross_attention", False)
        ):  # GPT-2: c_attn (in, 3E) holds q | k | v along its outputs; c_proj (E, E)
            width = num_heads * head_dim
            parts = [(f"{prefix}c_attn.weight", 0, offset) for offset in (0, width, 2 * width)]
            layers.append(HeadLayer(name, num_heads, head_dim, [*parts, (f"{prefix}c_proj.weight", 1, 0)]))
        elif (
            self_attention is not None
            and all(is_prunable_layer(getattr(self_attention, x, nn.Identity())) for x in ("query", "key", "value"))
            and is_prunable_layer(getattr(output, "dense", nn.Identity()))
        ):  # BERT-like: attention.self.{query,key,value} and attention.output.dense
            head_dim = int(getattr(self_attention, "attention_head_size", 0))
            heads = int(getattr(self_attention, "num_attention_heads", 0))
            if head_dim and heads:
                parts = [(f"{prefix}self.{x}.weight", 0, 0) for x in ("query", "key", "value")]
                layers.append(HeadLayer(name, heads, head_dim, [*parts, (f"{prefix}output.dense.weight", 1, 0)]))
        elif (
            q_proj is not None
            and k_proj is not None
            and v_proj is not None
            and o_proj is not None
            and all(is_prunable_layer(m) for m in (q_proj, k_proj, v_proj, o_proj))
        ):
            head_dim = getattr(module, "head_dim", None) or getattr(module, "head_size", None)
            config_heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
            if not isinstance(head_dim, int) and isinstance(config_heads, int):
                head_dim = q_proj.weight.shape[0] // config_heads
            if not isinstance(head_dim, int) or q_proj.weight.shape[0] % head_dim:
                continue
            heads = q_proj.weight.shape[0] // head_dim
            o_name = next(n for n in ("o_proj", "out_proj", "dense") if hasattr(module, n))
            parts = [(f"{prefix}q_proj.weight", 0, 0)]
            if k_proj.weight.shape[0] == q_proj.weight.shape[0]:  # no grouped-query attention
                parts += [(f"{prefix}k_proj.weight", 0, 0), (f"{prefix}v_proj.weight", 0, 0)]
            layers.append(HeadLayer(name, heads, head_dim, [*parts, (f"{prefix}{o_name}.weight", 1, 0)]))
    return layers


# ---------------------------------------------------------------------------------------------- selection
def score_bits(scores: torch.Tensor, pruned: torch.Tensor | None = None) -> torch.Tensor:
    """Non-negative float scores as ordered int32 keys; already pruned entries get the smallest key (0).

    Entries not yet pruned get a key >= 1, so a pruned entry is always chosen before a kept one whose
    score happens to be exactly zero: masks only grow as the sparsity rises.
    """
    bits = scores.detach().float().abs().contiguous().view(torch.int32).clamp_min(1)
    return bits.masked_fill(pruned, 0) if pruned is not None else bits


def select_smallest(keys: Sequence[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Boolean tensors (True = selected) marking exactly the ``k`` smallest keys across ``keys``.

    The threshold is the k-th smallest key (``kthvalue`` for one tensor; for several, possibly on
    different devices, bisection on the key value: <= 31 passes, one count each, no concatenated
    copy); ties at the threshold go to the earliest positions, in the order of ``keys`` then of the
    flattened tensor.
    """
    total = sum(key.numel() for key in keys)
    if k <= 0:
        return [torch.zeros_like(key, dtype=torch.bool) for key in keys]
    if k >= total:
        return [torch.ones_like(key, dtype=torch.bool) for key in keys]

    def count_at_most(threshold: int) -> int:
        return sum(int((key <= threshold).sum()) for key in keys)

    if len(keys) == 1:  # one tensor: the k-th smallest key directly (a few kernels, no full sort)
        low = int(keys[0].flatten().kthvalue(k).values)
    else:
        low, high = 0, _INF_BITS
        while low < high:
            middle = (low + high) // 2
            if count_at_most(middle) >= k:
                high = middle
            else:
                low = middle + 1
    ties_wanted = k - (count_at_most(low - 1) if low > 0 else 0)
    selected = []
    for key in keys:
        chosen = key < low
        ties = (key == low).flatten()
        if ties_wanted > 0 and bool(ties.any()):
            take = ties & (ties.cumsum(0) <= ties_wanted)
            ties_wanted -= int(take.sum())
            chosen = chosen | take.view_as(key)
        selected.append(chosen)
    return selected


def _count(sparsity: float, size: int) -> int:
    return int(sparsity * size + 0.5)


# ---------------------------------------------------------------------------------------------- methods
def unstructured_masks(
    targets: Sequence[Target], masks: dict[str, torch.Tensor], sparsity: float, scope: str
) -> dict[str, torch.Tensor]:
    """Magnitude pruning: the smallest ``|w|`` of each layer (``scope="layer"``) or of all targets together."""
    keys = [score_bits(t.weight, ~masks[t.name] if t.name in masks else None) for t in targets]
    if scope == "global":
        chosen = select_smallest(keys, _count(sparsity, sum(key.numel() for key in keys)))
    else:
        chosen = [select_smallest([key], _count(sparsity, key.numel()))[0] for key in keys]
    return {t.name: ~c for t, c in zip(targets, chosen)}


def structured_masks(
    targets: Sequence[Target], masks: dict[str, torch.Tensor], sparsity: float, dim: str, norm: int
) -> dict[str, torch.Tensor]:
    """Whole output rows (``dim="outputs"``) or input columns (``"inputs"``) of each layer, by Lp norm."""
    axis = 0 if dim == "outputs" else 1
    result = {}
    for target in targets:
        weight = target.out_in(target.weight.detach()).float()  # (out, in)
        norms = torch.linalg.vector_norm(weight, ord=norm, dim=1 - axis)  # (out,) or (in,)
        pruned = None
        if target.name in masks:
            pruned = ~target.out_in(masks[target.name]).any(dim=1 - axis)
        chosen = select_smallest([score_bits(norms, pruned)], _count(sparsity, norms.numel()))[0]
        keep = torch.ones_like(weight, dtype=torch.bool)
        if axis == 0:
            keep[chosen] = False
        else:
            keep[:, chosen] = False
        result[target.name] = target.out_in(keep).contiguous()
    return result


def nm_masks(
    targets: Sequence[Target], masks: dict[str, torch.Tensor], sparsity: float, n: int, m: int
) -> dict[str, torch.Tensor]:
    """N:M sparsity along the input dimension, reached gradually.

    In each group of ``m`` consecutive input weights the ``m - n`` smallest are the candidates; at
    sparsity ``s`` the ``s * numel`` smallest candidates of the layer are pruned, so at ``s = 1 - n/m``
    every group keeps exactly its ``n`` largest magnitudes.
    """
    result = {}
    for target in targets:
        weight = target.out_in(target.weight.detach())  # (out, in)
        pruned = ~target.out_in(masks[target.name]) if target.name in masks else None
        keys = score_bits(weight, pruned).view(weight.shape[0], -1, m)  # (out, in / m, m)
        order = torch.argsort(keys, dim=-1, stable=True)
        candidate = torch.zeros_like(keys, dtype=torch.bool).scatter_(-1, order[..., : m - n], True)
        keys = keys.masked_fill(~candidate, _INF_BITS)
        wanted = min(_count(sparsity, weight.numel()), int(candidate.sum()))
        chosen = select_smallest([keys], wanted)[0].view(weight.shape)
        result[target.name] = target.out_in(~chosen).contiguous()
    return result


def head_masks(
    targets: Sequence[Target], heads: Sequence[HeadLayer], masks: dict[str, torch.Tensor], sparsity: float, norm: int
) -> dict[str, torch.Tensor]:
    """Whole attention heads of each layer, the heads with the smallest Lp norm of their weights first."""
    by_name = {t.name: t for t in targets}
    result = {t.name: torch.ones_like(t.weight, dtype=torch.bool) for t in targets}
    for layer in heads:
        d = layer.head_dim
        norms, pruned = [], []
        for h in range(layer.num_heads):
            pieces, kept = [], False
            for name, axis, offset in layer.parts:
                target = by_name[name]
                pieces.append(_head_slice(target.out_in(target.weight.detach()).float(), axis, offset, h, d).flatten())
                if name in masks:
                    kept |= bool(_head_slice(target.out_in(masks[name]), axis, offset, h, d).any())
                else:
                    kept = True
            norms.append(torch.linalg.vector_norm(torch.cat(pieces), ord=norm).cpu())
            pruned.append(not kept)
        keys = score_bits(torch.stack(norms), torch.tensor(pruned))
        chosen = select_smallest([keys], _count(sparsity, layer.num_heads))[0]
        for h in torch.nonzero(chosen).flatten().tolist():
            for name, axis, offset in layer.parts:
                _head_slice(by_name[name].out_in(result[name]), axis, offset, h, d).fill_(False)
    return {name: mask.contiguous() for name, mask in result.items()}


def _head_slice(tensor: torch.Tensor, axis: int, offset: int, head: int, head_dim: int) -> torch.Tensor:
    return tensor.narrow(axis, offset + head * head_dim, head_dim)


def nm_problems(targets: Sequence[Target], m: int) -> list[str]:
    """Layers whose input dimension is not a multiple of ``m``."""
    return [
        f"layer {t.module_name!r} has {t.out_in(t.weight).shape[1]} input features, not a multiple of m={m}; "
        "exclude it with `exclude`."
        for t in targets
        if t.out_in(t.weight).shape[1] % m
    ]


def is_n_m_sparse(weight: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """Does every group of ``m`` consecutive inputs of an ``(out, in)`` weight hold at most ``n`` non-zeros?"""
    if weight.ndim != 2 or weight.shape[1] % m:
        return False
    return bool(((weight != 0).view(weight.shape[0], -1, m).sum(-1) <= n).all())


# ---------------------------------------------------------------------------------------------- storage
_BIT_VALUES = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits in a flat uint8 CPU tensor (8 weights a byte, for checkpoints)."""
    flat = mask.detach().flatten().cpu()
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_VALUES).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    numel = 1
    for size in shape:
        numel *= int(size)
    bits = (packed.cpu().to(torch.uint8).unsqueeze(1) & _BIT_VALUES) != 0  # (bytes, 8)
    return bits.flatten()[:numel].view(*shape)


# ---------------------------------------------------------------------------------------------- schedule
def cubic_sparsity(step: int, start: int, end: int, frequency: int, initial: float, final: float) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3, t on the grid t0 + kΔt."""
    if step < start:
        return 0.0
    if step >= end:
        return final
    grid_step = start + (step - start) // frequency * frequency
    progress = (grid_step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def measure_sparsity(targets: Sequence[Target]) -> dict[str, float]:
    """Fraction of exact zeros, per module name and ``"global"`` over all targets, counted from the weights."""
    result, zeros, total = {}, 0, 0
    for target in targets:
        layer_zeros = int((target.weight.detach() == 0).sum())
        result[target.module_name] = layer_zeros / target.weight.numel()
        zeros += layer_zeros
        total += target.weight.numel()
    result["global"] = zeros / max(total, 1)
    return result


# ---------------------------------------------------------------------------------------------- 2:4 inference
def to_semi_structured(model: nn.Module) -> list[str]:
    """Swap the 2:4-sparse Linear / Conv1D weights of ``model`` for ``torch.sparse`` semi-structured tensors.

    For inference on NVIDIA GPUs with sparse tensor cores (compute capability >= 8.0: A100, H100,
    RTX 30xx / 40xx): weights must be CUDA, float16 or bfloat16, and both dimensions multiples of
    the backend's tile (cuSPARSELt 16 x 16, CUTLASS 32 x 64). Layers that are not 2:4 sparse along
    their inputs are left dense; ``Conv1D`` layers become equivalent ``nn.Linear`` layers. The
    converted weights are frozen (``requires_grad=False``). Returns the names of the converted modules.

    Raises:
        ConfigurationError: no capable GPU, no 2:4-sparse layer, or a 2:4 layer with an unsupported
            device / dtype / shape; every problem is named in one message.

    Example::

        Pruning("n:m", schedule="one_shot").prune_module(model)
        model = model.half().cuda().eval()
        to_semi_structured(model)
    """
    problems = []
    if not torch.cuda.is_available():
        problems.append("it needs a CUDA GPU with compute capability >= 8.0 (torch.cuda.is_available() is False).")
    layers = []
    for name, module in model.named_modules():
        if is_prunable_layer(module):
            weight = module.weight.t() if is_conv1d(module) else module.weight  # (out, in)
            if is_n_m_sparse(weight.detach(), 2, 4):
                layers.append((name, module))
    if not layers:
        problems.append("the model has no 2:4-sparse Linear / Conv1D layer; prune it with Pruning('n:m') first.")
    backend = _semi_structured_backend()
    for name, module in layers:
        weight = module.weight
        out_features, in_features = weight.shape[::-1] if is_conv1d(module) else weight.shape
        if name == "" and is_conv1d(module):
            problems.append("the model itself is a Conv1D; wrap it in a module (nn.Sequential(model)).")
        capability = torch.cuda.get_device_capability(weight.device) if weight.is_cuda else None
        if capability is not None and capability < (8, 0):
            problems.append(
                f"{name!r} is on {torch.cuda.get_device_name(weight.device)} (compute capability < 8.0, "
                "no sparse tensor cores)."
            )
        elif capability is not None and capability[0] != 8 and backend.__name__.endswith("CUTLASS"):
            problems.append(
                f"{name!r}: cuSPARSELt is not available in this PyTorch build and the CUTLASS kernels run on "
                "compute capability 8.x only."
            )
        elif not weight.is_cuda and torch.cuda.is_available():
            problems.append(f"{name!r} is on {weight.device}; move the model to the GPU first.")
        if weight.dtype not in (torch.float16, torch.bfloat16):
            problems.append(f"{name!r} is {weight.dtype}; use float16 or bfloat16 (model.half()).")
            continue
        rows, cols = _min_shape(backend, weight.dtype)
        if out_features % rows or in_features % cols:
            problems.append(
                f"{name!r} is {out_features} x {in_features} (out x in); both must be multiples of {rows} x {cols}."
            )
    if problems:
        raise ConfigurationError("to_semi_structured: " + " ".join(problems))
    from torch.sparse import to_sparse_semi_structured

    converted = []
    for name, module in layers:
        if is_conv1d(module):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(
                in_features, out_features, bias=module.bias is not None, device=module.weight.device,
                dtype=module.weight.dtype,
            )  # fmt: skip
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
            module = linear
        sparse = to_sparse_semi_structured(module.weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        converted.append(name)
    return converted


def _semi_structured_backend() -> type:
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS as Cutlass

    cusparselt = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
    if getattr(SparseSemiStructuredTensor, "_FORCE_CUTLASS", False) or not cusparselt:
        return Cutlass
    return SparseSemiStructuredTensorCUSPARSELT


def _min_shape(backend: type, dtype: torch.dtype) -> tuple[int, int]:
    constraints = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    if constraints is None:
        return (32, 64)  # the strictest tile of both backends
    return int(constraints.sparse_min_rows), int(constraints.sparse_min_cols)
