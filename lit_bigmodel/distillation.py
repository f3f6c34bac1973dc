"""`DistillationModule`: teacher–student distillation for any pair of Hugging Face models sharing a vocabulary."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from lit_bigmodel._checks import check_number
from lit_bigmodel._sharding import hf_zero3_loading
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import DISTILLATION_LOSSES, IGNORE_INDEX
from lit_bigmodel.nets.builders import ModelSource, build_model
from lit_bigmodel.objectives import DistillationObjective
from lit_bigmodel.sft import SFTModule

DistillLoss = Literal["forward_kl", "reverse_kl", "jsd", "mse"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class DistillationModule(SFTModule):
    """Train a student on ``alpha · hard-label loss + (1 − alpha) · distillation loss`` from a frozen teacher.

    An `SFTModule` whose objective is a `DistillationObjective` composing the hard-label objective
    (``objective=``, default the task's) with the distillation terms; every other argument is
    `SFTModule`'s (``learning_rate``, ``compile``, ``gradient_checkpointing``, ``padding_free``, ...)
    and means the same for the student. ``chunked_loss`` does not apply: the distillation term needs
    the student's full logits, and the hard-label term is computed from them.

    The teacher is built in ``configure_model`` like the student, then frozen: eval mode, no
    gradients, never in the optimizer, forward under ``torch.no_grad`` (optionally in bfloat16).
    For causal LMs only completion tokens count (the datamodules' labels); for classifiers every
    example counts; gradient accumulation and ranks are weighted by those units, as in `SFTModule`.
    Extra terms: hidden-state matching through ``hidden_layer_map`` (student layer → teacher layer,
    0 = embeddings; a learned projection where widths differ) and attention-map KL through
    ``attention_layer_map`` (1-based transformer layers; the mapped layers must have as many heads).
    With ``on_policy_fraction`` λ > 0 (causal LM), a fraction λ of training batches replaces the
    completions with the student's own samples and uses the distillation loss alone (GKD).

    Offline mode: ``teacher=None`` and a `TeacherLogitsDataModule`, whose batches carry the
    teacher's cached top-k logits; the teacher is never in memory during training.

    Validation, test, ``generate`` and ``export`` act on the student (`SFTModule`'s); ``val/loss`` is
    the hard-label loss.

    Args:
        student, teacher: a ``save_pretrained`` directory, a ``PretrainedConfig`` or a factory.
        teacher_tokenizer: checked against the student's tokenizer (same vocabulary, same ids).
        alpha: weight of the hard-label loss, in [0, 1].
        temperature: softening of both distributions (> 0); the loss is scaled by T².
        loss: ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (generalized, with ``beta``) or ``"mse"``.
        beta: the generalized JSD's interpolation, in [0, 1].
        top_k: compare over the teacher's top-k tokens only.
        hidden_layer_map, hidden_loss, hidden_weight: hidden-state matching (``"mse"`` or ``"cosine"``).
        attention_layer_map, attention_weight: attention-map matching.
        on_policy_fraction: the fraction λ of on-policy batches, in [0, 1].
        teacher_dtype: ``"bfloat16"`` (or ``"float16"``) to run the teacher at lower precision.
        seed: seeds the on-policy draws (by step, so a resumed run draws alike).
        **kwargs: `SFTModule`'s arguments (``task``, ``tokenizer``, ``learning_rate``, ``compile``, ...).

    Raises:
        ConfigurationError: invalid arguments (this module's and `SFTModule`'s, reported together);
            vocabularies that differ; layer maps out of range; mapped attention layers whose head
            counts differ (in ``configure_model``).

    Example::

        teacher = "runs/teacher"                            # a save_pretrained directory
        student = GPT2Config(n_layer=2, n_embd=96, n_head=4)
        module = DistillationModule(student, teacher, alpha=0.5, temperature=2.0, loss="jsd", beta=0.5)
        L.Trainer(max_steps=1000).fit(module, ArithmeticDataModule())
    """

    def __init__(
        self,
        student: ModelSource,
        teacher: ModelSource | None,
        teacher_tokenizer: str | PreTrainedTokenizerBase | None = None,
        alpha: float = 0.5,
        temperature: float = 2.0,
        loss: DistillLoss = "forward_kl",
        beta: float = 0.5,
        top_k: int | None = None,
        hidden_layer_map: Mapping[int, int] | None = None,
        hidden_loss: Literal["mse", "cosine"] = "mse",
        hidden_weight: float = 1.0,
        attention_layer_map: Mapping[int, int] | None = None,
        attention_weight: float = 1.0,
        on_policy_fraction: float = 0.0,
        teacher_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        problems = [
            problem
            for problem in (
                check_number("alpha", alpha, low=0, high=1),
                check_number("temperature", temperature, low=0, low_open=True),
                check_number("beta", beta, low=0, high=1),
                None if top_k is None else check_number("top_k", top_k, low=1, integer=True),
                check_number("hidden_weight", hidden_weight, low=0),
                check_number("attention_weight", attention_weight, low=0),
                check_number("on_policy_fraction", on_policy_fraction, low=0, high=1),
                check_number("seed", seed, integer=True),
            )
            if problem is not None
        ]
        if loss not in DISTILLATION_LOSSES:
            problems.append(f"`loss` must be one of {DISTILLATION_LOSSES}, got {loss!r}.")
        if hidden_loss not in ("mse", "cosine"):
            problems.append(f"`hidden_loss` must be 'mse' or 'cosine', got {hidden_loss!r}.")
        for name, layer_map in (("hidden_layer_map", hidden_layer_map), ("attention_layer_map", attention_layer_map)):
            if layer_map is not None and any(int(k) < 0 or int(v) < 0 for k, v in layer_map.items()):
                problems.append(f"`{name}` must map non-negative layer indices, got {dict(layer_map)!r}.")
        task = kwargs.get("task", "causal_lm")
        if on_policy_fraction > 0 and task != "causal_lm":
            problems.append("`on_policy_fraction` > 0 needs task='causal_lm' (the student samples completions).")
        if on_policy_fraction > 0 and kwargs.get("padding_free"):
            problems.append("`on_policy_fraction` > 0 needs padding_free=False (the student samples per example).")
        if teacher_dtype is not None and teacher_dtype not in _DTYPES:
            problems.append(f"`teacher_dtype` must be one of {tuple(_DTYPES)} or None, got {teacher_dtype!r}.")
        try:
            super().__init__(student, **kwargs)
        except ConfigurationError as err:  # one message for every problem, SFTModule's first
            raise ConfigurationError(" ".join([str(err), *problems])) from None
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.save_hyperparameters(
            ignore=["student", "teacher", "tokenizer", "teacher_tokenizer", "objective", "peft", "quantization"]
        )
        self.teacher_source = teacher
        self.teacher_tokenizer = load_tokenizer(teacher_tokenizer) if teacher_tokenizer is not None else None
        self.objective = DistillationObjective(
            self.objective, alpha, temperature, loss, beta, top_k, hidden_layer_map, hidden_loss, hidden_weight,
            attention_layer_map, attention_weight,
        )  # fmt: skip
        self.on_policy_fraction = on_policy_fraction
        self.teacher_dtype = teacher_dtype
        self.seed = seed
        self.teacher: Any = None
        self.projections = nn.ModuleDict()

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.teacher_source is not None:
            with hf_zero3_loading(self._trainer):  # sharded like the student under ZeRO-3, loaded the ZeRO-3 way
                teacher = build_model(self.teacher_source, self.task, self.num_labels, self.tokenizer)
            teacher.requires_grad_(False)
            if self.teacher_dtype is not None:
                teacher.to(_DTYPES[self.teacher_dtype])
            self.teacher = self.shard_for_fsdp2(teacher).eval()
            self._check_vocabularies()
        if cast(DistillationObjective, self.objective).attention_weight > 0:
            for network in (self.model, self.teacher):
                if network is not None and hasattr(network, "set_attn_implementation"):
                    network.set_attn_implementation("eager")  # SDPA kernels do not return attention maps
        self._check_layer_maps_and_build_projections()

    def _check_vocabularies(self) -> None:
        student_vocab = self.model.get_input_embeddings().num_embeddings
        teacher_vocab = self.teacher.get_input_embeddings().num_embeddings
        if student_vocab != teacher_vocab:
            raise ConfigurationError(
                f"teacher and student must share the vocabulary: the student embeds {student_vocab} tokens, "
                f"the teacher {teacher_vocab}."
            )
        if self.tokenizer is None or self.teacher_tokenizer is None:
            return
        ours, theirs = self.tokenizer.get_vocab(), self.teacher_tokenizer.get_vocab()
        if ours != theirs:
            differing = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
            raise ConfigurationError(
                f"teacher and student tokenizers differ (size {len(ours)} vs {len(theirs)}; "
                f"e.g. token ids {differing}): distillation needs the same vocabulary and ids."
            )

    def _check_layer_maps_and_build_projections(self) -> None:
        objective = cast(DistillationObjective, self.objective)
        hidden_map, attention_map = objective.hidden_layer_map, objective.attention_layer_map
        if not hidden_map and not attention_map:
            return
        if self.teacher is None:
            raise ConfigurationError(
                "hidden-state and attention matching need the teacher in memory (teacher=None given)."
            )
        s_layers, t_layers = _num_layers(self.model), _num_layers(self.teacher)
        problems = []
        for name, layer_map, low in (("hidden_layer_map", hidden_map, 0), ("attention_layer_map", attention_map, 1)):
            for s, t in layer_map.items():
                if not (low <= s <= s_layers and low <= t <= t_layers):
                    problems.append(
                        f"`{name}` maps student layer {s} to teacher layer {t}, but the student has layers "
                        f"{low}..{s_layers} and the teacher {low}..{t_layers}."
                    )
        if attention_map:
            s_heads, t_heads = _num_heads(self.model), _num_heads(self.teacher)
            if s_heads != t_heads:
                problems.append(
                    f"`attention_layer_map` {attention_map!r} compares attention maps head by head, but the student "
                    f"has {s_heads} heads and the teacher {t_heads} heads per layer: map only models with equal "
                    "head counts, or leave attention_layer_map unset."
                )
        if problems:
            raise ConfigurationError(" ".join(problems))
        s_width, t_width = _width(self.model), _width(self.teacher)
        for s in hidden_map:
            # Under FSDP2, which puts no wrapper around the module, an unsharded projection would get no
            # gradient all-reduce: each is sharded like the networks (a no-op under other strategies).
            self.projections[str(s)] = (
                self.shard_for_fsdp2(nn.Linear(s_width, t_width)) if s_width != t_width else nn.Identity()
            )

    def trainable_modules(self) -> list[nn.Module]:
        return [self.model, self.projections]

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never leaves eval mode (no dropout)
        return self

    # ------------------------------------------------------------------ training
    def training_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``batch``, or with probability ``on_policy_fraction`` the student's samples, marked ``on_policy``."""
        batch, on_policy = self._maybe_on_policy(batch)
        return {**batch, "on_policy": True} if on_policy else batch  # type: ignore[dict-item]

    def _maybe_on_policy(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
        """With probability λ (seeded by the step, so resume is exact), swap completions for student samples."""
        if self.on_policy_fraction <= 0:
            return batch, False
        draw = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.global_step))
        if float(draw) >= self.on_policy_fraction:
            return batch, False
        if "document_ids" in batch:
            raise ConfigurationError(
                "on-policy distillation needs unpacked batches: set the datamodule's packing=False."
            )
        return self._student_completions(batch), True

    @torch.no_grad()
    def _student_completions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels, input_ids = batch["labels"], batch["input_ids"]
        labelled = labels != IGNORE_INDEX
        prompt_lengths = labelled.int().argmax(dim=1).tolist()  # first completion token = end of the prompt
        completion_lengths = labelled.sum(dim=1)
        pad = self._special_id("pad_token_id")
        pad = pad if pad is not None else 0
        prompts = [input_ids[i, :n].tolist() for i, n in enumerate(prompt_lengths)]
        width = max(len(p) for p in prompts)
        prompt_ids = input_ids.new_full((len(prompts), width), pad)
        prompt_mask = torch.zeros_like(prompt_ids)
        for i, prompt in enumerate(prompts):
            prompt_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            prompt_mask[i, width - len(prompt) :] = 1
        sampled = self.generate(prompt_ids, prompt_mask, do_sample=True, max_new_tokens=int(completion_lengths.max()))
        sampled = sampled[:, width:]
        eos = self._special_id("eos_token_id")
        rows, row_labels = [], []
        for i, prompt in enumerate(prompts):
            completion = sampled[i].tolist()
            if eos is not None and eos in completion:
                completion = completion[: completion.index(eos) + 1]
            if not completion:
                completion = [eos if eos is not None else pad]
            rows.append(prompt + completion)
            row_labels.append([IGNORE_INDEX] * len(prompt) + completion)
        length = max(len(r) for r in rows)
        out = {
            "input_ids": input_ids.new_full((len(rows), length), pad),
            "attention_mask": input_ids.new_zeros((len(rows), length)),
            "labels": input_ids.new_full((len(rows), length), IGNORE_INDEX),
        }
        for i, (row, row_label) in enumerate(zip(rows, row_labels)):
            out["input_ids"][i, : len(row)] = torch.tensor(row)
            out["attention_mask"][i, : len(row)] = 1
            out["labels"][i, : len(row)] = torch.tensor(row_label)
        return out


def _num_layers(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigurationError(
        f"cannot tell how many layers {type(model).__name__} has (no num_hidden_layers in its config)."
    )


def _width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigurationError(f"cannot tell the hidden width of {type(model).__name__} (no hidden_size in its config).")


def _num_heads(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ConfigurationError(
        f"cannot tell how many attention heads {type(model).__name__} has (no num_attention_heads in its config)."
    )
