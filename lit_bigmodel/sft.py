"""`SFTModule`: supervised fine-tuning of any Hugging Face model (causal LM or sequence classification)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import Any, Literal, cast

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedTokenizerBase

from lit_bigmodel._rng import restore_rng_states, rng_states
from lit_bigmodel.datamodules.packing import block_causal_mask
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError, OutputExistsError
from lit_bigmodel.losses import IGNORE_INDEX, causal_lm_loss
from lit_bigmodel.nets.builders import ModelSource, Task, build_model, max_positions

Schedule = Literal["cosine", "linear", "constant"]
_TASKS = ("causal_lm", "sequence_classification")
_SCHEDULES = ("cosine", "linear", "constant")


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a Hugging Face model, for causal LMs and sequence classifiers.

    Causal LM: the loss is next-token cross-entropy on the labelled tokens only (the datamodules
    label prompts -100, as TRL's completion-only loss). Validation / test report loss, perplexity,
    token accuracy and, when batches carry prompts, the exact match of greedy generations.
    Classification: cross-entropy, accuracy and macro F1.

    The network is built in ``configure_model`` (so FSDP / DeepSpeed ZeRO-3 can shard it at
    creation) from a local directory, a ``PretrainedConfig`` (fresh weights; vocabulary size and
    special-token ids from the tokenizer) or a factory returning an ``nn.Module``. Without a
    ``tokenizer`` argument the datamodule's ``tokenizer`` is used.

    Optimizer: AdamW (fused on CUDA), no weight decay on biases, norms and embeddings; learning
    rate warmed up linearly for ``warmup_steps`` optimizer steps (a float < 1 is a fraction of the
    run), then decayed (``lr_schedule``) to ``min_lr_ratio`` × ``learning_rate``.

    Args:
        model: where the network comes from (see above).
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        num_labels: classes, for classification (default: the datamodule's ``num_labels``).
        generate_eval: score greedy generations by exact match in validation / test.
        max_new_tokens: generation budget of `generate` (evaluation uses the reference length + 1).

    Raises:
        ConfigurationError: an invalid argument (named in the message).

    Example::

        from transformers import GPT2Config
        from lit_bigmodel import SFTModule
        from lit_bigmodel.datamodules import ArithmeticDataModule

        module = SFTModule(GPT2Config(n_layer=2, n_embd=128, n_head=4), learning_rate=1e-3)
        L.Trainer(max_steps=1000).fit(module, ArithmeticDataModule())
        module.export("out/model")   # save_pretrained directory: model + tokenizer
    """

    def __init__(
        self,
        model: ModelSource,
        task: Task = "causal_lm",
        num_labels: int | None = None,
        tokenizer: str | PreTrainedTokenizerBase | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int | float = 0.05,
        lr_schedule: Schedule = "cosine",
        min_lr_ratio: float = 0.0,
        generate_eval: bool = True,
        max_new_tokens: int = 32,
    ) -> None:
        super().__init__()
        problems = []
        if task not in _TASKS:
            problems.append(f"`task` must be one of {_TASKS}, got {task!r}.")
        if num_labels is not None and num_labels < 2:
            problems.append(f"`num_labels` must be >= 2 or None, got {num_labels!r}.")
        if not learning_rate > 0:
            problems.append(f"`learning_rate` must be > 0, got {learning_rate!r}.")
        if weight_decay < 0:
            problems.append(f"`weight_decay` must be >= 0, got {weight_decay!r}.")
        if len(betas) != 2 or not all(0 <= beta < 1 for beta in betas):
            problems.append(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        if warmup_steps < 0:
            problems.append(f"`warmup_steps` must be >= 0 (steps, or a fraction < 1 of the run), got {warmup_steps!r}.")
        if lr_schedule not in _SCHEDULES:
            problems.append(f"`lr_schedule` must be one of {_SCHEDULES}, got {lr_schedule!r}.")
        if not 0 <= min_lr_ratio <= 1:
            problems.append(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}.")
        if max_new_tokens < 1:
            problems.append(f"`max_new_tokens` must be >= 1, got {max_new_tokens!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.save_hyperparameters(ignore=["model", "tokenizer"])
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.betas = (float(betas[0]), float(betas[1]))
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.min_lr_ratio = min_lr_ratio
        self.generate_eval = generate_eval
        self.max_new_tokens = max_new_tokens
        self.model_source = model
        self.task = task
        self.num_labels = num_labels
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        self.model: Any = None  # the Hugging Face network, built in configure_model
        self.metrics = nn.ModuleDict()
        self._pending_rng_states: dict[str, Any] | None = None

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.tokenizer is None and datamodule is not None:
            self.tokenizer = getattr(datamodule, "tokenizer", None)
        if self.task == "sequence_classification":
            data_labels = getattr(datamodule, "num_labels", None)
            if self.num_labels is None:
                self.num_labels = data_labels
            elif data_labels is not None and data_labels != self.num_labels:
                raise ConfigurationError(
                    f"`num_labels` is {self.num_labels} but the datamodule has {data_labels} labels."
                )
            if self.num_labels is None:
                raise ConfigurationError(
                    "`num_labels` is required for sequence classification (or a datamodule that sets it)."
                )
        self._build_metrics()

    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = build_model(self.model_source, self.task, self.num_labels, self.tokenizer)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        if (
            self.task == "sequence_classification"
            and self.model.config.pad_token_id is None
            and self.tokenizer is not None
        ):
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def _build_metrics(self) -> None:
        if len(self.metrics):
            return
        for stage in ("val", "test"):
            metrics: dict[str, Metric]
            if self.task == "causal_lm":
                metrics = {"loss": MeanMetric(), "token_accuracy": MeanMetric(), "exact_match": MeanMetric()}
            else:
                assert self.num_labels is not None
                metrics = {
                    "loss": MeanMetric(),
                    "accuracy": MulticlassAccuracy(num_classes=self.num_labels),
                    "f1": MulticlassF1Score(num_classes=self.num_labels, average="macro"),
                }
            self.metrics[stage] = nn.ModuleDict(metrics)

    def _metrics(self, stage: str) -> dict[str, Metric]:
        return {name: cast(Metric, metric) for name, metric in cast(nn.ModuleDict, self.metrics[stage]).items()}

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the network: ``(B, T, V)`` for a causal LM, ``(B, C)`` for a classifier."""
        if self.model is None:
            self.configure_model()
        return self.model(**self.model_inputs(batch)).logits

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The keyword arguments of the network's forward for ``batch`` (packed rows get a block mask)."""
        input_ids = batch["input_ids"]  # (B, T)
        limit = max_positions(self.model)
        if limit is not None and input_ids.shape[1] > limit:
            raise ConfigurationError(
                f"a batch holds sequences of {input_ids.shape[1]} tokens but the model accepts at most {limit}; "
                "lower the datamodule's `max_length` or set its `overflow`."
            )
        kwargs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": batch["attention_mask"]}
        if "document_ids" in batch:  # packed rows
            kwargs["attention_mask"] = block_causal_mask(batch["document_ids"])  # (B, 1, T, T)
            kwargs["position_ids"] = batch["position_ids"]
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return kwargs

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss; override this one hook to change the objective."""
        if self.task == "causal_lm":
            return causal_lm_loss(logits, batch["labels"])[0]
        return F.cross_entropy(logits.float(), batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss_from_logits(self(batch), batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        metrics = self._metrics(stage)
        logits = self(batch)
        if self.task == "causal_lm":
            loss, num_tokens = causal_lm_loss(logits, batch["labels"])
            metrics["loss"].update(loss, weight=num_tokens)
            labels = batch["labels"][:, 1:]  # (B, T-1)
            labelled = labels != IGNORE_INDEX
            correct = logits[:, :-1].argmax(-1) == labels
            metrics["token_accuracy"].update(correct[labelled].float())
            if self.generate_eval and "prompt_input_ids" in batch:
                metrics["exact_match"].update(self._exact_match(batch).float())
        else:
            labels = batch["labels"]
            metrics["loss"].update(F.cross_entropy(logits.float(), labels), weight=labels.numel())
            metrics["accuracy"].update(logits, labels)
            metrics["f1"].update(logits, labels)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        metrics = self._metrics(stage)
        values = {f"{stage}/{name}": metric.compute() for name, metric in metrics.items() if metric.update_count}
        if self.task == "causal_lm" and f"{stage}/loss" in values:
            values[f"{stage}/perplexity"] = torch.exp(values[f"{stage}/loss"])
        self.log_dict(values, prog_bar=stage == "val")
        for metric in metrics.values():
            metric.reset()

    @torch.no_grad()
    def _exact_match(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per example: does the greedy generation equal the reference completion, then stop? ``(B,)`` bool."""
        target = batch["completion_ids"]  # (B, C), -100-padded
        width = target.shape[1] + 1  # the answer, then EOS
        prompt = batch["prompt_input_ids"]  # (B, P), left-padded
        generated = self.generate(prompt, batch["prompt_attention_mask"], max_new_tokens=width)[:, prompt.shape[1] :]
        eos = self._special_id("eos_token_id")
        if generated.shape[1] < width:
            filler = torch.full_like(generated[:, :1], eos if eos is not None else IGNORE_INDEX)
            generated = torch.cat([generated, filler.expand(-1, width - generated.shape[1])], dim=1)
        if eos is not None:
            ended = (generated == eos).cumsum(dim=1) > 0  # EOS and everything after it
            generated = generated.masked_fill(ended, IGNORE_INDEX)
        padded_target = F.pad(target, (0, 1), value=IGNORE_INDEX)  # (B, width)
        return (generated == padded_target).all(dim=1)

    # ------------------------------------------------------------------ generation and export
    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **generate_kwargs: Any
    ) -> torch.Tensor:
        """Greedy (by default) generation with the network's ``generate``; prompts left-padded.

        Returns ``(B, P + new)`` token ids, prompts included. Any ``generate`` argument may be passed.
        """
        if self.model is None:
            self.configure_model()
        assert self.model is not None
        network = getattr(self.model, "_orig_mod", self.model)
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        pad, eos = self._special_id("pad_token_id"), self._special_id("eos_token_id")
        if pad is not None or eos is not None:
            kwargs["pad_token_id"] = pad if pad is not None else eos
        if eos is not None:
            kwargs["eos_token_id"] = eos
        kwargs.update(generate_kwargs)
        was_training = network.training
        network.eval()
        try:
            return network.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            network.train(was_training)

    def _special_id(self, name: str) -> int | None:
        value = getattr(self.tokenizer, name, None) if self.tokenizer is not None else None
        if value is None and self.model is not None:
            value = getattr(getattr(self.model, "config", None), name, None)
        return value if isinstance(value, int) else None

    def export(self, dirpath: str | os.PathLike[str], overwrite: bool = False) -> str:
        """Write a ``save_pretrained`` directory (model and, if known, tokenizer) that ``transformers`` loads.

        The directory is written beside the target and renamed into place, so it is either
        complete or absent. Only global rank zero writes.

        Raises:
            OutputExistsError: ``dirpath`` exists and is not empty, and ``overwrite`` is False.

        Example::

            module.export("out/model")
            AutoModelForCausalLM.from_pretrained("out/model")
        """
        target = os.path.abspath(os.fspath(dirpath))
        if os.path.exists(target) and (not os.path.isdir(target) or os.listdir(target)) and not overwrite:
            raise OutputExistsError(
                f"export directory {target!r} exists and is not empty; pass overwrite=True to replace it."
            )
        if self.model is None:
            raise ConfigurationError(
                "nothing to export: the model is not built yet (train it, or call configure_model())."
            )
        if self._trainer is not None and not self.trainer.is_global_zero:
            return target
        network = getattr(self.model, "_orig_mod", self.model)
        if not hasattr(network, "save_pretrained"):
            raise ConfigurationError(
                f"the model ({type(network).__name__}) has no save_pretrained: it is not a Hugging Face model."
            )
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=parent)
        try:
            network.save_pretrained(staging)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(staging)
            if os.path.exists(target):
                old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old.", dir=parent)
                os.replace(target, os.path.join(old, "dir"))
                os.replace(staging, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                shutil.rmtree(staging, ignore_errors=True)
        return target

    # ------------------------------------------------------------------ optimization
    def trainable_modules(self) -> list[nn.Module]:
        """The modules whose parameters the optimizer updates (the network; subclasses add theirs)."""
        return [self.model]

    def configure_optimizers(self) -> Any:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        seen: set[int] = set()
        for module in (m for root in self.trainable_modules() for m in root.modules()):
            is_norm_or_embedding = isinstance(module, nn.Embedding) or "norm" in type(module).__name__.lower()
            for name, param in module.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue  # tied weights (embedding = LM head) are listed once, as the embedding
                seen.add(id(param))
                (no_decay if is_norm_or_embedding or name.endswith("bias") or param.ndim < 2 else decay).append(param)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        fused = all(p.is_cuda for p in decay + no_decay)
        optimizer = torch.optim.AdamW(groups, lr=self.learning_rate, betas=self.betas, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_steps * total) if self.warmup_steps < 1 else int(self.warmup_steps)
        schedule = _warmup_decay(warmup, total, self.lr_schedule, self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lit_bigmodel_rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng_states = checkpoint.get("lit_bigmodel_rng_states")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not at load time: creating the data iterator in between draws random numbers.
        if self._pending_rng_states is not None:
            restore_rng_states(self._pending_rng_states)
            self._pending_rng_states = None


def _warmup_decay(warmup: int, total: int, schedule: str, min_ratio: float) -> Any:
    """Learning-rate factor at step ``t``: linear warmup to 1, then ``schedule`` down to ``min_ratio``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return min_ratio + (1 - min_ratio) * shape

    return factor
