"""`SFTModule`: supervised fine-tuning of any Hugging Face model (causal LM or sequence classification)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers import PreTrainedTokenizerBase

from lit_bigmodel._rng import restore_rng_states, rng_states
from lit_bigmodel._sharding import (
    full_state_dict,
    hf_zero3_loading,
    is_fsdp2,
    offloads_optimizer,
    shards_parameters,
    zero_stage,
)
from lit_bigmodel.datamodules.packing import block_causal_mask
from lit_bigmodel.datamodules.padding_free import flatten_batch
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.export import CHECKPOINT_KEY, check_target, export_info, write_pretrained
from lit_bigmodel.losses import IGNORE_INDEX, causal_lm_loss, chunked_causal_lm_loss
from lit_bigmodel.nets.builders import ModelSource, Task, build_model, max_positions
from lit_bigmodel.schedules import ModuleScheduleName

_TASKS = ("causal_lm", "sequence_classification")
_SCHEDULES = ("cosine", "linear", "constant")
_TrainLoss = Callable[[dict[str, Any], dict[str, torch.Tensor]], torch.Tensor]  # (model inputs, batch) -> loss
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# config fields of causal LMs that transform the logits after the LM head (the chunked loss would skip them)
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


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

    Fast path (training step): the causal-LM loss is computed from the network's final hidden
    states and its LM head in chunks, never holding full-vocabulary float32 logits
    (`chunked_causal_lm_loss`; same value and gradients as `causal_lm_loss`); the step's network
    computation is compiled with ``torch.compile`` on CUDA; the step makes no host sync (the
    progress-bar copy of the loss is refreshed every ``log_every_n_steps`` steps only). The chunked
    loss steps aside, with one info line, when a subclass overrides `loss_from_logits` or when the
    network is not a Hugging Face causal LM whose logits are ``head(base_model(...))``.
    Data loading: the datamodules pin memory on CUDA; set their ``num_workers`` > 0 to prefetch.

    Args:
        model: where the network comes from (see above).
        task: ``"causal_lm"`` or ``"sequence_classification"``.
        num_labels: classes, for classification (default: the datamodule's ``num_labels``).
        generate_eval: score greedy generations by exact match in validation / test.
        max_new_tokens: generation budget of `generate` (evaluation uses the reference length + 1).
        compile: ``torch.compile`` the training step's network and loss computation (not the
            LightningModule, not evaluation or generation). ``None``: on CUDA only (compiling takes
            seconds to minutes, which dominates short CPU runs), and not under ZeRO-3 / FSDP / FSDP2,
            where the network holds sharded parameters; ``True`` / ``False``; or a mode,
            one of ``"default"``, ``"reduce-overhead"``, ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``.
        chunked_loss: causal LM only: compute the training loss without materialising the
            ``(B, T, V)`` logits (see above). ``False`` uses `loss_from_logits` on the full logits.
        loss_chunk_size: tokens per chunk of the chunked loss (memory ∝ chunk × vocabulary).
        gradient_checkpointing: recompute activations in backward to save memory (the network's
            ``gradient_checkpointing_enable``, non-reentrant).
        padding_free: causal LM only: flatten each training batch into one row without padding
            (position ids restart at every example, as Hugging Face's ``DataCollatorWithFlattening``);
            padded and packed batches both work. Pays off with ``attn_implementation="flash_attention_2"``
            (variable-length kernels); with ``"sdpa"`` / ``"eager"`` attention it is correct but
            builds an ``(N, N)`` mask over all N tokens of the batch, so prefer the datamodules'
            ``packing=True`` there.

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
        lr_schedule: ModuleScheduleName = "cosine",
        min_lr_ratio: float = 0.0,
        generate_eval: bool = True,
        max_new_tokens: int = 32,
        compile: bool | str | None = None,
        chunked_loss: bool = True,
        loss_chunk_size: int = 4096,
        gradient_checkpointing: bool = False,
        padding_free: bool = False,
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
        if not (compile is None or isinstance(compile, bool) or compile in _COMPILE_MODES):
            problems.append(f"`compile` must be None, True, False or one of {_COMPILE_MODES}, got {compile!r}.")
        if isinstance(loss_chunk_size, bool) or not isinstance(loss_chunk_size, int) or loss_chunk_size < 1:
            problems.append(f"`loss_chunk_size` must be an integer >= 1, got {loss_chunk_size!r}.")
        if padding_free and task != "causal_lm":
            problems.append(f"`padding_free=True` needs task='causal_lm', got task={task!r}.")
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
        self.compile_mode = compile
        self.chunked_loss = chunked_loss
        self.loss_chunk_size = loss_chunk_size
        self.gradient_checkpointing = gradient_checkpointing
        self.padding_free = padding_free
        self.metrics = nn.ModuleDict()
        self._pending_rng_states: dict[str, Any] | None = None
        self._export_info: dict[str, Any] | None = None
        self._train_loss: _TrainLoss | None = None
        self._train_loss_key: int | None = None  # id() of the network `_train_loss` was built for
        if padding_free:
            # An instance hook, not a class override: Lightning warns about an overridden batch-transfer hook
            # whenever a datamodule is used, so only modules that flatten batches carry one.
            self.on_before_batch_transfer = self._flatten_training_batch  # type: ignore[method-assign]

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
        with hf_zero3_loading(self._trainer):  # Lightning builds under deepspeed.zero.Init at stage 3
            self.model = build_model(self.model_source, self.task, self.num_labels, self.tokenizer)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        if self.gradient_checkpointing:
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated)
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif hasattr(self.model, "gradient_checkpointing_enable"):
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                raise ConfigurationError(
                    f"`gradient_checkpointing=True` needs a network with gradient_checkpointing_enable() "
                    f"(a Hugging Face model), got {type(self.model).__name__}."
                )
        self.model = self.shard_for_fsdp2(self.model)
        if (
            self.task == "sequence_classification"
            and self.model.config.pad_token_id is None
            and self.tokenizer is not None
        ):
            self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def shard_for_fsdp2(self, network: nn.Module) -> nn.Module:
        """Under `ModelParallelStrategy` (FSDP2), ``fully_shard`` each transformer block, then the network.

        Called in ``configure_model`` for every network the module builds; a no-op under any other strategy.
        """
        if not is_fsdp2(self._trainer):
            return network
        from lit_bigmodel.strategies import fully_shard_blocks

        mesh = self.device_mesh
        assert mesh is not None  # ModelParallelStrategy sets it before configure_model
        return fully_shard_blocks(network, mesh["data_parallel"])

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

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the network's forward for ``batch`` (packed rows get a block mask)."""
        input_ids = batch["input_ids"]  # (B, T)
        limit = max_positions(self.model)
        flattened = "cu_seq_lens" in batch  # padding-free: each example was checked against the limit
        if limit is not None and not flattened and input_ids.shape[1] > limit:
            raise ConfigurationError(
                f"a batch holds sequences of {input_ids.shape[1]} tokens but the model accepts at most {limit}; "
                "lower the datamodule's `max_length` or set its `overflow`."
            )
        kwargs: dict[str, Any] = {"input_ids": input_ids}
        if "attention_mask" in batch:  # absent: no padding (random-token benchmarks, padding-free rows)
            kwargs["attention_mask"] = batch["attention_mask"]
        if "document_ids" in batch:  # packed rows
            kwargs["attention_mask"] = block_causal_mask(batch["document_ids"])  # (B, 1, T, T)
            kwargs["position_ids"] = batch["position_ids"]
        elif "position_ids" in batch:  # padding-free: one row, positions restart at every example
            kwargs["position_ids"] = batch["position_ids"]
            kwargs["use_cache"] = False  # with a cache, Hugging Face models do not look for packed sequences
            if "cu_seq_lens" in batch and "flash" in str(getattr(self.model.config, "_attn_implementation", "")):
                # variable-length flash attention without deriving the boundaries on the device (a host sync)
                kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = batch["cu_seq_lens"]
                kwargs["max_length_q"] = kwargs["max_length_k"] = int(batch["max_length"])
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        return kwargs

    def loss_from_logits(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss; override this one hook to change the objective."""
        if self.task == "causal_lm":
            return causal_lm_loss(logits, batch["labels"])[0]
        return F.cross_entropy(logits.float(), batch["labels"])

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of ``batch``: the override point for objectives that need more than the logits.

        By default `loss_from_logits` on the network's logits, or, for a causal LM with
        ``chunked_loss=True`` and no override of `loss_from_logits`, the same loss from the final
        hidden states without the full logits; compiled when ``compile`` says so.
        """
        if self._train_loss is None or self._train_loss_key != id(self.model):
            self._train_loss = self._build_train_loss()
            self._train_loss_key = id(self.model)
        return self._train_loss(self.model_inputs(batch), batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self._log_train_loss(loss, batch)
        return loss

    def _log_train_loss(self, loss: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, batch_size=batch_size)  # kept on the device: loggers read it every n steps
        # Lightning turns progress-bar values into numbers after every step (.item(), a host sync on CUDA),
        # so the progress bar gets a CPU copy, refreshed when the loggers write.
        every = getattr(self._trainer, "log_every_n_steps", 1) or 1
        if self.global_step % every == 0:
            self.log("loss", loss.detach().cpu(), prog_bar=True, logger=False, batch_size=batch_size)

    def _flatten_training_batch(self, batch: Any, dataloader_idx: int) -> Any:
        """``on_before_batch_transfer`` with ``padding_free=True``: flatten training batches on the host."""
        if self._trainer is not None and self.trainer.training:
            batch = flatten_batch(batch, max_positions(self.model) if self.model is not None else None)
        return batch

    def _build_train_loss(self) -> _TrainLoss:
        """The function ``(model inputs, batch) -> loss`` of the training step, compiled if asked."""
        network = self.model
        attention = str(getattr(getattr(network, "config", None), "_attn_implementation", ""))
        if self.padding_free and "flash" not in attention:
            rank_zero_warn(
                f"`padding_free=True` with attn_implementation={attention!r}: the model masks the flattened row "
                "with an (N, N) block mask, slower than the datamodule's `packing=True`; use flash_attention_2."
            )
        head_and_body = self._chunked_loss_parts()
        if head_and_body is not None:
            body, head = head_and_body
            chunk_size = self.loss_chunk_size

            # `use_cache` stays the model's default: with use_cache=False and no attention mask, transformers 5
            # checks the position ids for packed sequences, which under torch.compile builds a (B, 1, T, T) mask
            # and so gives up SDPA's flash kernel (is_causal=True).
            def train_loss(inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
                hidden = body(**inputs).last_hidden_state  # (B, T, D)
                return chunked_causal_lm_loss(hidden, head.weight, batch["labels"], chunk_size)[0]

        else:

            def train_loss(inputs: dict[str, Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
                return self.loss_from_logits(network(**inputs).logits, batch)

        compile_mode = self.compile_mode
        if compile_mode is None:  # on CUDA, and not where the network's parameters are sharded (untested there)
            compile_mode = self.device.type == "cuda" and not shards_parameters(self._trainer)
        if compile_mode is False:
            return train_loss
        mode = compile_mode if isinstance(compile_mode, str) and compile_mode != "default" else None
        return cast(_TrainLoss, torch.compile(train_loss, mode=mode))

    def _chunked_loss_parts(self) -> tuple[nn.Module, nn.Linear] | None:
        """``(body, head)`` when the chunked loss applies to this module and network, else None (said once)."""
        if not self.chunked_loss or self.task != "causal_lm":
            return None
        if type(self).loss_from_logits is not SFTModule.loss_from_logits:
            rank_zero_info(f"{type(self).__name__} overrides `loss_from_logits`: training uses the full logits.")
            return None
        if zero_stage(self._trainer) == 3 or is_fsdp2(self._trainer):
            # The head's weight is read outside the head's forward: ZeRO-3 and FSDP2 hold only a shard of it there.
            rank_zero_info("`chunked_loss` falls back to the full-logits loss under ZeRO-3 / FSDP2.")
            return None
        parts = _body_and_head(self.model)
        if isinstance(parts, str):
            rank_zero_info(f"`chunked_loss` falls back to the full-logits loss: {parts}.")
            return None
        return parts

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)  # compiled functions and closures do not pickle (ddp_spawn pickles the module)
        state["_train_loss"] = state["_train_loss_key"] = None
        return state

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
        if shards_parameters(self._trainer) and self.trainer.world_size > 1:
            # Every forward is collective when the weights are sharded: a rank whose rows all ended must go on
            # stepping until every rank is done (transformers cannot tell from the network under ZeRO-3 / FSDP2).
            kwargs["synced_gpus"] = True
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
        complete or absent. Only global rank zero writes. Under FSDP, FSDP2 and DeepSpeed ZeRO-3 the
        weights are gathered first, so every rank must call it (it is collective there); the
        directory holds the full, unsharded model.

        Raises:
            OutputExistsError: ``dirpath`` exists and is not empty, and ``overwrite`` is False.

        Example::

            module.export("out/model")
            AutoModelForCausalLM.from_pretrained("out/model")
        """
        target = check_target(dirpath, overwrite)
        if self.model is None:
            raise ConfigurationError(
                "nothing to export: the model is not built yet (train it, or call configure_model())."
            )
        network = getattr(self.model, "_orig_mod", self.model)
        if not hasattr(network, "save_pretrained"):
            raise ConfigurationError(
                f"the model ({type(network).__name__}) has no save_pretrained: it is not a Hugging Face model."
            )
        state = full_state_dict(self._trainer, self, network)  # collective under sharding; None off rank zero
        if state is None:
            return target
        return write_pretrained(target, network, self.tokenizer, state)

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
                # By module and name, not by ``param.ndim``: under ZeRO-3 and FSDP a parameter is a flat shard.
                (no_decay if is_norm_or_embedding or name.endswith("bias") else decay).append(param)
        groups = [
            {"params": params, "weight_decay": wd}
            for params, wd in ((decay, self.weight_decay), (no_decay, 0.0))
            if params  # an empty group breaks DeepSpeed's optimizer wrappers
        ]
        optimizer: torch.optim.Optimizer
        if offloads_optimizer(self._trainer):  # DeepSpeed refuses a torch optimizer with its state on the CPU
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(groups, lr=self.learning_rate, betas=self.betas, adamw_mode=True)
        else:
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
        if self.model is not None:  # for `lit-bigmodel export CKPT OUT`: the config and tokenizer, not only weights
            if self._export_info is None:
                network = getattr(self.model, "_orig_mod", self.model)
                self._export_info = export_info(self.task, network, self.tokenizer)
            if self._export_info is not None:
                checkpoint[CHECKPOINT_KEY] = self._export_info

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


def _body_and_head(model: Any) -> tuple[nn.Module, nn.Linear] | str:
    """The network's body (hidden states) and bias-free linear LM head, or why the chunked loss cannot use them.

    Hugging Face causal LMs compute ``logits = get_output_embeddings()(base_model(...).last_hidden_state)``
    (GPT-2 with its tied embedding, Llama with its own head, ...). Models that transform the logits
    afterwards are recognised from their config and, where the weights are materialised, by
    comparing both ways on a few tokens once.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return f"{type(model).__name__} has no bias-free nn.Linear LM head (get_output_embeddings)"
    body = getattr(model, "base_model", None)
    if not isinstance(body, nn.Module) or body is model:
        return f"{type(model).__name__} has no base model separate from its LM head"
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"its config sets `{name}`={value!r}, a transform of the logits after the head"
    if getattr(head.weight, "ds_id", None) is not None:
        return "DeepSpeed ZeRO-3 partitions the LM head's weight outside the head's forward"
    reason = _check_head_and_body(model, body, head)
    return reason if reason is not None else (body, head)


@torch.no_grad()
def _check_head_and_body(model: Any, body: nn.Module, head: nn.Linear) -> str | None:
    """None if ``head(body(x))`` equals ``model(x).logits`` on a few tokens (or cannot be checked here)."""
    weight = head.weight
    if weight.is_meta or weight.numel() == 0 or type(weight) is not nn.Parameter:
        return None  # not materialised here (meta / sharded): the structure has to do
    input_ids = (torch.arange(8, device=weight.device) % head.out_features)[None]  # (1, 8)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()  # no dropout, so both ways compute the same function
    try:
        expected = model(input_ids=input_ids).logits  # (1, 8, V)
        got = head(body(input_ids=input_ids).last_hidden_state)
    except Exception as err:  # any network that does not follow the pattern
        return f"calling its base model and head separately failed ({type(err).__name__}: {err})"
    finally:
        for module, training in modes:
            module.training = training
    if got.shape != expected.shape or not torch.allclose(got.float(), expected.float(), rtol=1e-3, atol=1e-3):
        return "its logits are not head(base_model(...)) (checked on a few tokens)"
    return None
