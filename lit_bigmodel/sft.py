"""`SFTModule`: supervised fine-tuning of any Hugging Face model (causal LM or sequence classification)."""

from __future__ import annotations

import os
from typing import Any, cast

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from transformers import BitsAndBytesConfig, PreTrainedTokenizerBase

from lit_bigmodel._checks import check_number
from lit_bigmodel._rng import PendingRandomState
from lit_bigmodel._sharding import (
    full_state_dict,
    hf_zero3_loading,
    is_fsdp,
    is_fsdp2,
    is_sharded,
    outside_zero_init,
    shards_parameters,
    zero_stage,
)
from lit_bigmodel.adapters import (
    ADAPTERS_KEY,
    PeftConfig,
    adapted_copy,
    apply_adapters,
    base_fingerprint,
    check_peft_config,
    check_same_base,
    export_adapters,
    keep_adapter_weights_only,
    peft_config_dict,
    uniform_trainable_dtype,
)
from lit_bigmodel.datamodules.padding_free import flatten_batch
from lit_bigmodel.datamodules.tokenization import load_tokenizer
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.evaluation import EvaluationMetrics, exact_match
from lit_bigmodel.export import CHECKPOINT_KEY, check_target, export_info, write_pretrained
from lit_bigmodel.inputs import network_inputs
from lit_bigmodel.nets.builders import ModelSource, Task, build_model, max_positions
from lit_bigmodel.objectives import CausalLMObjective, ClassificationObjective, Objective, Step, UnitWeighting
from lit_bigmodel.optim import adamw, decay_groups
from lit_bigmodel.qlora import (
    check_quantization,
    check_quantized_device,
    compute_dtype,
    dequantized_state,
    prepare_quantized,
)
from lit_bigmodel.quantization.layers import quantized_layers
from lit_bigmodel.schedules import LRSchedule, ModuleScheduleName, callback_sets_learning_rate

_CONFIG_OBJECTS = ("peft", "quantization")  # arguments that are objects, left out of checkpoints' hyperparameters
_TASKS = ("causal_lm", "sequence_classification")
_SCHEDULES = ("cosine", "linear", "constant")
_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class SFTModule(L.LightningModule):
    """Supervised fine-tuning of a Hugging Face model, for causal LMs and sequence classifiers.

    The training loss is one component, ``objective`` (`lit_bigmodel.objectives`): by default
    `CausalLMObjective` (next-token cross-entropy on the labelled tokens only; the datamodules label
    prompts -100, as TRL's completion-only loss) or `ClassificationObjective` (cross-entropy).
    Validation / test report the objective's loss (its `Objective.from_logits`) and, for a causal LM,
    perplexity, token accuracy and, when batches carry prompts, the exact match of greedy
    generations; for a classifier, accuracy and macro F1.

    Custom loss: pass ``objective=`` an `Objective` subclass (implement ``from_logits``; ``bind`` if it
    needs more than the logits). That is the one override point; `DistillationModule` composes it.

    Gradient accumulation and data parallelism weight by units (labelled tokens, or examples): ``k``
    accumulated micro-batches on ``n`` ranks give the gradients of one batch holding all of them
    (`UnitWeighting`; under DeepSpeed, each micro-batch's mean). ``train/loss`` is each batch's mean.

    The network is built in ``configure_model`` (so FSDP / DeepSpeed ZeRO-3 can shard it at
    creation) from a local directory, a ``PretrainedConfig`` (fresh weights; vocabulary size and
    special-token ids from the tokenizer) or a factory returning an ``nn.Module``. Without a
    ``tokenizer`` argument the datamodule's ``tokenizer`` is used.

    Optimizer: AdamW (fused on CUDA), no weight decay on biases, norms and embeddings. The learning
    rate follows `lit_bigmodel.schedules.LRSchedule`: warmed up linearly over ``warmup_steps``
    optimizer steps (step t gets (t+1)/W × ``learning_rate``; a float < 1 is a fraction of the run),
    then decayed (``lr_schedule``) to ``min_lr_ratio`` × ``learning_rate``. Who owns the rate: when
    the Trainer holds a callback that sets it (`lit_bigmodel.callbacks.LRDecay`), that callback
    does, from ``learning_rate``, and the module installs no scheduler of its own.

    Fast path (training step): the causal-LM loss is computed from the network's final hidden
    states and its LM head in chunks (``chunked_loss``, see `CausalLMObjective`); the objective's
    computation, network included, is compiled with ``torch.compile`` on CUDA; the step makes no
    host sync (the progress-bar copy of the loss is refreshed every ``log_every_n_steps`` steps only).
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
            ``(B, T, V)`` logits (`CausalLMObjective`'s ``chunked``); ``False``: from the full logits.
        loss_chunk_size: tokens per chunk of the chunked loss (memory ∝ chunk × vocabulary).
        gradient_checkpointing: recompute activations in backward to save memory (the network's
            ``gradient_checkpointing_enable``, non-reentrant).
        padding_free: causal LM only: flatten each training batch into one row without padding
            (position ids restart at every example, as Hugging Face's ``DataCollatorWithFlattening``);
            padded and packed batches both work. Pays off with ``attn_implementation="flash_attention_2"``
            (variable-length kernels); with ``"sdpa"`` / ``"eager"`` attention it is correct but
            builds an ``(N, N)`` mask over all N tokens of the batch, so prefer the datamodules'
            ``packing=True`` there.
        objective: the training objective (see above); None: the task's default, built from
            ``chunked_loss`` and ``loss_chunk_size``.
        peft: a ``peft.PeftConfig`` (``LoraConfig(r=8, target_modules="all-linear")``, with
            ``use_dora=True`` for DoRA, ``use_rslora=True`` for rsLoRA, ...): the network gets those
            adapters in ``configure_model`` (`lit_bigmodel.adapters`) and only they (and a classifier's
            head) train. Checkpoints then hold the trainable weights only, with a fingerprint of the
            frozen base that a resume checks (DeepSpeed's files too; FSDP / FSDP2 distributed
            checkpoints, one shard per rank, keep the base, which their resume reads); ``export``
            writes the merged model or, with ``merge=False``, the adapter folder. Works under every
            strategy: ddp, FSDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 (see `_inject_adapters`, `export`).
        full_checkpoints: with ``peft``, checkpoints hold the whole network (the base too).
        quantization: QLoRA: a ``transformers.BitsAndBytesConfig`` (``load_in_4bit=True``,
            ``bnb_4bit_quant_type="nf4"``, ``bnb_4bit_compute_dtype=torch.bfloat16``): the base loads
            quantized through bitsandbytes (``model`` must be a directory or hub id; ``peft`` is
            required), the adapters train in the compute dtype. Needs a CUDA device, on one device or
            under DDP (`lit_bigmodel.qlora`). Export with ``merge=False`` (the adapter folder) or
            ``dequantize=True`` (merged into the dequantized base).

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
        objective: Objective | None = None,
        peft: PeftConfig | None = None,
        full_checkpoints: bool = False,
        quantization: BitsAndBytesConfig | None = None,
    ) -> None:
        super().__init__()
        problems = [
            problem
            for problem in (
                None if num_labels is None else check_number("num_labels", num_labels, low=2, integer=True),
                check_number("learning_rate", learning_rate, low=0, low_open=True),
                check_number("weight_decay", weight_decay, low=0),
                check_number("warmup_steps", warmup_steps, low=0),
                check_number("min_lr_ratio", min_lr_ratio, low=0, high=1),
                check_number("max_new_tokens", max_new_tokens, low=1, integer=True),
                check_number("loss_chunk_size", loss_chunk_size, low=1, integer=True),
            )
            if problem is not None
        ]
        if task not in _TASKS:
            problems.insert(0, f"`task` must be one of {_TASKS}, got {task!r}.")
        if len(betas) != 2 or any(check_number("betas", beta, low=0, high=1, high_open=True) for beta in betas):
            problems.append(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        if lr_schedule not in _SCHEDULES:
            problems.append(f"`lr_schedule` must be one of {_SCHEDULES}, got {lr_schedule!r}.")
        if not (compile is None or isinstance(compile, bool) or compile in _COMPILE_MODES):
            problems.append(f"`compile` must be None, True, False or one of {_COMPILE_MODES}, got {compile!r}.")
        if padding_free and task != "causal_lm":
            problems.append(f"`padding_free=True` needs task='causal_lm', got task={task!r}.")
        if objective is not None and not isinstance(objective, Objective):
            problems.append(f"`objective` must be an Objective (lit_bigmodel.objectives) or None, got {objective!r}.")
        if peft is not None and (problem := check_peft_config(peft, task)) is not None:
            problems.append(problem)
        if quantization is not None and (problem := check_quantization(quantization, model, peft)) is not None:
            problems.append(problem)
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.save_hyperparameters(ignore=["model", "tokenizer", "objective", "peft", "quantization"])
        self.quantization = quantization
        self.peft = peft
        self.full_checkpoints = full_checkpoints
        self.adapters: Any = None  # the peft.PeftModel around the network (saves and merges the adapters)
        self._base_fingerprint: list[float] = []  # of the frozen base, taken when it is built (before sharding)
        if peft is not None and not full_checkpoints:
            self.strict_loading = False  # adapter-only checkpoints leave the frozen base out
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
        self.metrics: EvaluationMetrics | None = None  # built in setup, when num_labels is known
        self._random_state = PendingRandomState()
        self._export_info: dict[str, Any] | None = None
        if objective is None:
            objective = (
                CausalLMObjective(chunked_loss, loss_chunk_size) if task == "causal_lm" else ClassificationObjective()
            )
        self.objective: Objective = objective
        self._step: Step | None = None  # the objective bound to the network (compiled if asked)
        self._step_key: int | None = None  # id() of the network `_step` was built for
        self._unit_weighting = UnitWeighting()
        if padding_free:
            # An instance hook, not a class override: Lightning warns about an overridden batch-transfer hook
            # whenever a datamodule is used, so only modules that flatten batches carry one.
            self.on_before_batch_transfer = self._flatten_training_batch  # type: ignore[method-assign]

    # ------------------------------------------------------------------ building
    def setup(self, stage: str) -> None:
        self._unit_weighting = UnitWeighting()  # decided again for this fit's strategy
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
        if self.metrics is None:
            self.metrics = EvaluationMetrics(self.task, self.num_labels)
        if self.peft is not None:
            self._configure_strategy_for_adapters()
        if self.quantization is not None and self._trainer is not None:
            strategy = self.trainer.strategy
            if (problem := check_quantized_device(strategy.root_device, type(strategy).__name__)) is not None:
                raise ConfigurationError(problem)

    def _configure_strategy_for_adapters(self) -> None:
        """What the sharded strategies need for ``peft`` adapters, set before they wrap the network.

        FSDP1 flattens each unit's parameters into one FlatParameter, which must require grad uniformly
        unless ``use_orig_params=True`` (frozen base, trainable adapters in one block): it is set. DeepSpeed
        writes the weights into its own checkpoint files: adapter-only checkpoints leave the frozen ones
        out there (``exclude_frozen_parameters``), as they do from Lightning's state dict elsewhere.
        """
        if self._trainer is None:
            return
        strategy = self.trainer.strategy
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        if isinstance(strategy, FSDPStrategy) and not strategy.kwargs.get("use_orig_params", False):
            rank_zero_warn(
                "`peft` adapters under FSDP: setting use_orig_params=True (with use_orig_params=False, FSDP refuses "
                "a unit holding frozen base weights and trainable adapters: 'FlatParameter requires uniform "
                "requires_grad')."
            )
            strategy.kwargs["use_orig_params"] = True
        if isinstance(strategy, DeepSpeedStrategy) and not self.full_checkpoints:
            strategy.exclude_frozen_parameters = True

    def configure_model(self) -> None:
        if self.model is not None:
            return
        with hf_zero3_loading(self._trainer):  # Lightning builds under deepspeed.zero.Init at stage 3
            self.model = build_model(self.model_source, self.task, self.num_labels, self.tokenizer, self._load_kwargs())
        if self.quantization is not None:
            self.model = prepare_quantized(self.model)
        self.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as they are
        if self.peft is not None:
            self._inject_adapters()
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

    def _load_kwargs(self) -> dict[str, Any] | None:
        """``from_pretrained`` options: a quantized base loads quantized, onto the Trainer's device."""
        if self.quantization is None:
            return None
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        return {"quantization_config": self.quantization, "device_map": {"": device}}

    def _inject_adapters(self) -> None:
        """Wrap the network with the ``peft`` adapters (in ``configure_model``, before FSDP2 shards it).

        Under ZeRO-3 the adapters are built whole (`outside_zero_init`: else peft initialises empty
        partitions, and LoRA's B would not start at zero), with transformers' ZeRO-3 path alive so that
        initialisers that read the base weight (DoRA, PiSSA) gather it. Under FSDP1 the adapters take the
        base's dtype (a FlatParameter has one dtype: float32 adapters beside a bfloat16 base fail with
        "Must flatten tensors with uniform dtype"); under FSDP2 the trainable parameters get one dtype.
        The base's fingerprint is taken here, while its weights are whole on every rank (under ZeRO-3
        they never are: no fingerprint).
        """
        fsdp1 = is_fsdp(self._trainer) and not is_fsdp2(self._trainer)
        with hf_zero3_loading(self._trainer), outside_zero_init(self._trainer):
            self.model, adapters = apply_adapters(self.model, self.peft, self.task, match_base_dtype=fsdp1)
        if is_fsdp2(self._trainer):
            uniform_trainable_dtype(self.model)
        if self.quantization is not None:  # QLoRA: the adapters compute in the base's compute dtype
            dtype = compute_dtype(self.quantization)
            for param in self.model.parameters():
                if param.requires_grad:
                    param.data = param.data.to(dtype)
        object.__setattr__(self, "adapters", adapters)  # not a submodule: it holds the network itself
        self._base_fingerprint = base_fingerprint(self.model)

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

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the network: ``(B, T, V)`` for a causal LM, ``(B, C)`` for a classifier."""
        if self.model is None:
            self.configure_model()
        return self.model(**self.model_inputs(batch)).logits

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The keyword arguments of the network's forward for ``batch`` (`lit_bigmodel.inputs.network_inputs`)."""
        return network_inputs(self.model, batch)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The objective's mean loss of ``batch``, computed as the training step does (fast path, compile)."""
        return self._objective_step()(self.model_inputs(batch), batch).mean

    def training_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch the objective trains on (``batch`` itself; `DistillationModule` swaps in on-policy samples)."""
        return batch

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        batch = self.training_batch(batch)
        terms = self._objective_step()(self.model_inputs(batch), batch)
        mean = terms.mean
        self._log_train_loss(mean.detach(), terms.logs, batch)
        return self._unit_weighting.loss(terms, mean, self._trainer, self.automatic_optimization)

    def _log_train_loss(
        self, loss: torch.Tensor, logs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]
    ) -> None:
        batch_size = batch["input_ids"].shape[0]
        if logs:
            self.log_dict(logs, batch_size=batch_size)
        self.log("train/loss", loss, batch_size=batch_size)  # kept on the device: loggers read it every n steps
        # Lightning turns progress-bar values into numbers after every step (.item(), a host sync on CUDA),
        # so the progress bar gets a CPU copy, refreshed when the loggers write.
        every = getattr(self._trainer, "log_every_n_steps", 1) or 1
        if self.global_step % every == 0:
            self.log("loss", loss.cpu(), prog_bar=True, logger=False, batch_size=batch_size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._unit_weighting.scale_gradients(self.trainer, self.parameters())

    def _flatten_training_batch(self, batch: Any, dataloader_idx: int) -> Any:
        """``on_before_batch_transfer`` with ``padding_free=True``: flatten training batches on the host."""
        if self._trainer is not None and self.trainer.training:
            batch = flatten_batch(batch, max_positions(self.model) if self.model is not None else None)
        return batch

    def _objective_step(self) -> Step:
        """The objective bound to the current network, compiled if ``compile`` says so (built once per network)."""
        if self._step is not None and self._step_key == id(self.model):
            return self._step
        attention = str(getattr(getattr(self.model, "config", None), "_attn_implementation", ""))
        if self.padding_free and "flash" not in attention:
            rank_zero_warn(
                f"`padding_free=True` with attn_implementation={attention!r}: the model masks the flattened row "
                "with an (N, N) block mask, slower than the datamodule's `packing=True`; use flash_attention_2."
            )
        step = self.objective.bind(self)
        compile_mode = self.compile_mode
        if compile_mode is None:  # on CUDA, and not where the network's parameters are sharded (untested there)
            compile_mode = self.device.type == "cuda" and not shards_parameters(self._trainer)
        if compile_mode is not False:
            mode = compile_mode if isinstance(compile_mode, str) and compile_mode != "default" else None
            step = cast(Step, torch.compile(step, mode=mode))
        self._step, self._step_key = step, id(self.model)
        return step

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state = dict(state)  # compiled functions and closures do not pickle (ddp_spawn pickles the module)
        state["_step"] = state["_step_key"] = None
        return state

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("val", batch)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate("test", batch)

    def _evaluate(self, stage: str, batch: dict[str, torch.Tensor]) -> None:
        assert self.metrics is not None  # built in setup
        logits = self(batch)
        matches = None
        if self.task == "causal_lm" and self.generate_eval and "prompt_input_ids" in batch:
            prompt = batch["prompt_input_ids"]  # (B, P), left-padded; the answer, then EOS
            width = batch["completion_ids"].shape[1] + 1
            generated = self.generate(prompt, batch["prompt_attention_mask"], max_new_tokens=width)
            matches = exact_match(
                generated[:, prompt.shape[1] :], batch["completion_ids"], self._special_id("eos_token_id")
            )
        self.metrics.update(stage, logits, batch, self.objective.from_logits(logits, batch), matches)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> None:
        if self.metrics is not None:
            self.log_dict(self.metrics.compute(stage), prog_bar=stage == "val")

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

    def export(
        self,
        dirpath: str | os.PathLike[str],
        overwrite: bool = False,
        merge: bool | None = None,
        dequantize: bool = False,
    ) -> str:
        """Write a ``save_pretrained`` directory (model and, if known, tokenizer) that ``transformers`` loads.

        The directory is written beside the target and renamed into place, so it is either
        complete or absent. Only global rank zero writes. Under FSDP, FSDP2 and DeepSpeed ZeRO-3 the
        weights are gathered first, so every rank must call it (it is collective there); the
        directory holds the full, unsharded model.

        With ``peft`` adapters, ``merge`` (the default) writes the network with the adapters merged
        into its weights (a plain ``transformers`` model); ``merge=False`` writes the adapter folder
        that ``peft.PeftModel.from_pretrained(base_model, dirpath)`` loads onto the base model. Under
        DeepSpeed, FSDP and FSDP2 the adapted network's full state dict is gathered (collective), and
        rank zero loads it into a CPU copy of the network, rebuilt from its config, which merges or saves.

        A quantized base (``quantization``) merges only with ``dequantize=True``: the adapters are merged
        into a float32 CPU copy of the dequantized base (what the quantized network computes with), which
        is written without quantization. Merging into the 4-bit weights would round them again.

        Raises:
            OutputExistsError: ``dirpath`` exists and is not empty, and ``overwrite`` is False.
            ConfigurationError: ``merge=False`` without ``peft``; merging a quantized base without ``dequantize``.

        Example::

            module.export("out/model")
            AutoModelForCausalLM.from_pretrained("out/model")
        """
        target = check_target(dirpath, overwrite)
        if merge is False and self.peft is None:
            raise ConfigurationError("`merge=False` exports adapters, but the module has no `peft` adapters.")
        if self.quantization is not None and merge is not False and not dequantize:
            raise ConfigurationError(
                "the base is quantized (`quantization`): merging the adapters into its 4-bit / 8-bit weights would "
                "quantize them again and lose part of what was learnt. Pass dequantize=True (merge into the "
                "dequantized base, written in float32) or merge=False (the adapter folder)."
            )
        if self.model is None:
            raise ConfigurationError(
                "nothing to export: the model is not built yet (train it, or call configure_model())."
            )
        network = getattr(self.model, "_orig_mod", self.model)
        if not hasattr(network, "save_pretrained"):
            raise ConfigurationError(
                f"the model ({type(network).__name__}) has no save_pretrained: it is not a Hugging Face model."
            )
        if self.adapters is not None:
            wrapper = self.adapters
            if is_sharded(self._trainer):  # the live weights are shards, or wrapped by DeepSpeed's engine
                state = full_state_dict(self._trainer, self, network)  # collective; None off rank zero
                if state is None:
                    return target
                wrapper = adapted_copy(network, self.adapters, self.task, state)
            elif self._trainer is not None and not self.trainer.is_global_zero:
                return target
            elif self.quantization is not None and merge is not False:
                wrapper = adapted_copy(network, self.adapters, self.task, dequantized_state(network))
            return export_adapters(target, wrapper, self.tokenizer, merge=merge is not False)
        if quantized_layers(network):  # converted by QuantizationAware (torchao tensors): written as torchao saves them
            from lit_bigmodel.quantization.save import export_quantized

            return export_quantized(self, dirpath, overwrite=overwrite)
        state = full_state_dict(self._trainer, self, network)  # collective under sharding; None off rank zero
        if state is None:
            return target
        return write_pretrained(target, network, self.tokenizer, state)

    # ------------------------------------------------------------------ optimization
    def trainable_modules(self) -> list[nn.Module]:
        """The modules whose parameters the optimizer updates (the network; subclasses add theirs)."""
        return [self.model]

    def configure_optimizers(self) -> Any:
        groups = decay_groups(self.trainable_modules(), self.weight_decay)
        optimizer = adamw(groups, self.learning_rate, self.betas, self._trainer)
        if callback_sets_learning_rate(self.trainer, 0):  # a callback (LRDecay) owns the rate: lit_bigmodel.schedules
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = int(self.warmup_steps * total) if self.warmup_steps < 1 else int(self.warmup_steps)
        schedule = LRSchedule(self.lr_schedule, warmup_steps=warmup, total_steps=total, min_lr=self.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.lr(step, 1.0))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._random_state.save(checkpoint)
        hparams = checkpoint.get(self.CHECKPOINT_HYPER_PARAMS_KEY)
        if isinstance(hparams, dict) and any(hparams.get(key) is not None for key in _CONFIG_OBJECTS):
            # A subclass that saves its own hyperparameters (through **kwargs) records the PeftConfig or
            # BitsAndBytesConfig object, and Lightning then refuses to resume (torch.load with weights_only=True).
            checkpoint[self.CHECKPOINT_HYPER_PARAMS_KEY] = {
                k: v for k, v in hparams.items() if k not in _CONFIG_OBJECTS
            }
        if self.adapters is not None and not self.full_checkpoints and self._adapter_only_checkpoints():
            keep_adapter_weights_only(checkpoint, self, self._base_fingerprint)
        if self.model is not None:  # for `lit-bigmodel export CKPT OUT`: the config and tokenizer, not only weights
            if self._export_info is None:
                network = getattr(self.model, "_orig_mod", self.model)
                self._export_info = export_info(self.task, network, self.tokenizer)
            if self._export_info is not None:
                checkpoint[CHECKPOINT_KEY] = self._export_info
                if self.adapters is not None:  # `lit-bigmodel export` rebuilds the adapters from their config
                    checkpoint[CHECKPOINT_KEY] = {**self._export_info, "peft": peft_config_dict(self.adapters)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._random_state.load(checkpoint)
        if ADAPTERS_KEY in checkpoint and self.model is not None:
            check_same_base(checkpoint, self.model, here=self._base_fingerprint)

    def _adapter_only_checkpoints(self) -> bool:
        """Whether this run's checkpoints leave the frozen base out: everywhere but DeepSpeed writing every weight.

        (Under DeepSpeed the weights are in its own files, adapter-only when ``exclude_frozen_parameters``
        is set, as `setup` does; FSDP / FSDP2 distributed checkpoints keep the base: see
        `keep_adapter_weights_only`.)
        """
        if zero_stage(self._trainer) is None:
            return True
        return bool(getattr(self.trainer.strategy, "exclude_frozen_parameters", False))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._random_state.restore()  # here, not at load time: creating the data iterator draws random numbers
