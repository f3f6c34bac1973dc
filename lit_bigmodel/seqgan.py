"""`SeqGANModule`: SeqGAN (Yu et al., AAAI 2017) with manual optimization and batched Monte Carlo rollouts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union, cast

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import SingleDeviceStrategy
from torch import nn

from lit_bigmodel._rng import PendingRandomState
from lit_bigmodel._sharding import is_fsdp, zero_stage
from lit_bigmodel.cuda_graphs import GraphedUpdate
from lit_bigmodel.errors import ConfigurationError
from lit_bigmodel.losses import discriminator_loss, policy_gradient_loss
from lit_bigmodel.metrics import HeldOutBLEU, NLLOracle
from lit_bigmodel.nets.cnn_discriminator import CNNDiscriminator
from lit_bigmodel.rollout import make_rollout_policy, monte_carlo_rewards, update_rollout_policy

NetworkSource = Union[nn.Module, Callable[[], nn.Module]]
PHASES = ("mle", "d_pretrain", "adversarial", "done")


class SeqGANModule(L.LightningModule):
    """SeqGAN: MLE pretraining of G, pretraining of D, then adversarial training with policy gradient.

    Each training step does one unit of the schedule on the real batch it is given:

    1. ``mle``: ``mle_epochs`` epochs of maximum-likelihood steps for G (Adam ``g_lr``, clip ``g_clip``);
    2. ``d_pretrain``: ``d_pretrain_rounds`` × (fresh negatives from G, ``d_epochs`` epochs of D
       steps, each on a real batch and an equally large batch of negatives);
    3. ``adversarial``: ``adv_epochs`` × (``g_steps`` policy-gradient steps on G with Monte Carlo
       rewards from ``rollout_num`` rollouts of the delayed rollout policy — updated with
       ``rollout_update_rate`` after the G steps — then ``d_steps`` × (fresh negatives, ``d_epochs``
       epochs of D)).

    An epoch is one pass of the real data's loader. Phase and counters, the negatives and the
    rollout policy live in the checkpoint, so a resumed run continues inside its phase, exactly.
    The module stops the trainer when the schedule is done (use ``max_epochs=-1``). NLL-oracle is
    logged as ``nll_oracle`` every ``eval_every`` epochs of the MLE and adversarial phases and at their ends (from
    ``nll_samples`` samples), when the datamodule has an ``oracle``; on real text (a datamodule
    with ``bleu_references`` and ``decode``, e.g. `TextLinesDataModule`), ``bleu`` of
    ``bleu_samples`` generated texts against the held-out lines (BLEU-``bleu_n_gram``).

    Args:
        generator: an `LSTMGenerator`, an `HFCausalLMGenerator`, or a factory returning one.
        discriminator: default: the paper's `CNNDiscriminator` for G's vocabulary.
        pg_baseline: subtract the batch-mean reward in the policy gradient.
        g_batch_size: rows per G update: an MLE step splits its real batch into updates of this size,
            and a policy-gradient step samples this many sequences; default: the real batch size.
        d_batch_size: rows per D update. A D step's real batch and as many negatives are shuffled
            together and split into updates of this size; default: the real batch size, i.e. two
            updates on mixed rows, as the released code's D loader (paper: 64). With a loader batch
            of the whole data (``OracleDataModule(batch_size=10_000)``) and ``g_batch_size`` =
            ``d_batch_size`` = 64, one training step is one epoch of the paper's updates, and
            Lightning's per-step work is paid ~3,500 times in the paper's run instead of ~500,000.
        cuda_graphs: run each full-size D update as a replayed CUDA graph (`GraphedUpdate`; D's Adam
            is then fused). Needs one device and ``precision="32-true"``; D's updates then skip
            Lightning's backward and ``optimizer_step`` hooks (``on_before_backward``,
            ``on_before_optimizer_step``, ...; ``trainer.global_step`` still counts them). On a CPU
            the same code runs eagerly, so a configuration can be tried there.
        reset_g_optimizer: start the adversarial phase with a fresh Adam state for G, as the
            released code, which uses separate optimizers for MLE and policy-gradient updates.

    Raises:
        ConfigurationError: invalid arguments; a DeepSpeed strategy (one optimizer only); FSDP or FSDP2
            (sampling and the rollout-policy update happen outside the forward pass).

    Example::

        module = SeqGANModule(LSTMGenerator(5000, 32, 32, 20), mle_epochs=120, adv_epochs=200)
        L.Trainer(max_epochs=-1).fit(module, OracleDataModule("seqgan_oracle_lstm.npz"))

        # the same updates on a GPU, one training step an epoch, D's updates as replayed CUDA graphs
        module = SeqGANModule(LSTMGenerator(5000, 32, 32, 20), g_batch_size=64, d_batch_size=64, cuda_graphs=True)
        data = OracleDataModule("seqgan_oracle_lstm.npz", batch_size=10_000)
        L.Trainer(max_epochs=-1, accelerator="gpu", devices=1).fit(module, data)
    """

    def __init__(
        self,
        generator: NetworkSource,
        discriminator: NetworkSource | None = None,
        mle_epochs: int = 120,
        d_pretrain_rounds: int = 50,
        d_epochs: int = 3,
        adv_epochs: int = 200,
        g_steps: int = 1,
        d_steps: int = 5,
        rollout_num: int = 16,
        rollout_update_rate: float = 0.8,
        g_lr: float = 0.01,
        d_lr: float = 1e-4,
        g_clip: float = 5.0,
        pg_baseline: bool = False,
        pg_reduction: str = "sum",
        nll_samples: int = 10_000,
        bleu_samples: int = 500,
        bleu_n_gram: int = 4,
        eval_every: int = 5,
        d_chunk_size: int | str | None = "auto",
        d_batch_size: int | None = None,
        reset_g_optimizer: bool = True,
        g_batch_size: int | None = None,
        cuda_graphs: bool = False,
    ) -> None:
        super().__init__()
        problems = []
        for name, value in (
            ("mle_epochs", mle_epochs),
            ("d_pretrain_rounds", d_pretrain_rounds),
            ("adv_epochs", adv_epochs),
        ):
            if value < 0:
                problems.append(f"`{name}` must be >= 0, got {value!r}.")
        for name, value in (
            ("d_epochs", d_epochs),
            ("g_steps", g_steps),
            ("d_steps", d_steps),
            ("rollout_num", rollout_num),
            ("eval_every", eval_every),
        ):
            if value < 1:
                problems.append(f"`{name}` must be >= 1, got {value!r}.")
        if not 0.0 <= rollout_update_rate <= 1.0:
            problems.append(f"`rollout_update_rate` must be in [0, 1], got {rollout_update_rate!r}.")
        if not (g_lr > 0 and d_lr > 0):
            problems.append(f"`g_lr` and `d_lr` must be > 0, got {g_lr!r} and {d_lr!r}.")
        if pg_reduction not in ("sum", "mean"):
            problems.append(f"`pg_reduction` must be 'sum' or 'mean', got {pg_reduction!r}.")
        for name, size in (("g_batch_size", g_batch_size), ("d_batch_size", d_batch_size)):
            if size is not None and size < 1:
                problems.append(f"`{name}` must be >= 1 or None, got {size!r}.")
        if nll_samples < 0:
            problems.append(f"`nll_samples` must be >= 0, got {nll_samples!r}.")
        if bleu_samples < 0:
            problems.append(f"`bleu_samples` must be >= 0, got {bleu_samples!r}.")
        if not 1 <= bleu_n_gram <= 4:
            problems.append(f"`bleu_n_gram` must be in [1, 4], got {bleu_n_gram!r}.")
        if problems:
            raise ConfigurationError(" ".join(problems))
        self.save_hyperparameters(ignore=["generator", "discriminator"])
        self.automatic_optimization = False
        self.cfg: Any = self.hparams  # the settings, by attribute
        self._generator_source, self._discriminator_source = generator, discriminator
        self.generator: Any = None
        self.discriminator: Any = None
        self.rollout_policy: Any = None
        self.__dict__["nll_oracle"] = None  # set in setup; kept out of the state_dict
        self.__dict__["bleu"] = None  # likewise, with the datamodule's decode function
        self._decode: Callable[[torch.Tensor], list[str]] | None = None
        self.schedule: dict[str, Any] = {
            "phase": _first_phase(mle_epochs, d_pretrain_rounds, adv_epochs),
            "epoch": 0,
            "unit": 0,
            "batch": 0,
        }
        self.negatives: torch.Tensor | None = None
        self.history: list[dict[str, Any]] = []
        self._random_state = PendingRandomState()
        self._d_update: GraphedUpdate | None = None

    @property
    def nll_oracle(self) -> NLLOracle | None:
        return self.__dict__["nll_oracle"]

    @property
    def bleu(self) -> HeldOutBLEU | None:
        return self.__dict__["bleu"]

    # ------------------------------------------------------------------ building
    def configure_model(self) -> None:
        if self.generator is not None:
            return
        self.generator = _build(self._generator_source)
        if self._discriminator_source is None:
            self.discriminator = CNNDiscriminator(self.generator.vocab_size)
        else:
            self.discriminator = _build(self._discriminator_source)
        self.rollout_policy = make_rollout_policy(self.generator)

    def setup(self, stage: str) -> None:
        if zero_stage(self.trainer) is not None:
            raise ConfigurationError(
                "SeqGANModule trains two networks with two optimizers, and Lightning's DeepSpeed strategy allows one. "
                "Use strategy='ddp_find_unused_parameters_true' or a single device instead."
            )
        if is_fsdp(self.trainer):
            raise ConfigurationError(
                f"SeqGANModule does not support {type(self.trainer.strategy).__name__}: it samples from the "
                "generator and moves the rollout policy towards it outside the model's forward pass, where FSDP "
                "holds only shards of the weights. Use strategy='ddp_find_unused_parameters_true' or a single "
                "device (the paper's networks have 7.7 M parameters; each rank holds them whole)."
            )
        strategy = self.trainer.strategy
        if (
            self.cfg.cuda_graphs
            and stage == "fit"
            and (not isinstance(strategy, SingleDeviceStrategy) or self.trainer.precision != "32-true")
        ):
            raise ConfigurationError(
                "`cuda_graphs=True` captures D's update on one device in full precision; got "
                f"{type(strategy).__name__} and precision={self.trainer.precision!r}. Use one device "
                "(strategy='auto', devices=1) and precision='32-true', or cuda_graphs=False."
            )
        datamodule = getattr(self.trainer, "datamodule", None)
        data_vocab = getattr(datamodule, "vocab_size", None)
        if isinstance(data_vocab, int) and self.generator is not None and self.generator.vocab_size < data_vocab:
            raise ConfigurationError(
                f"the generator's vocabulary ({self.generator.vocab_size}) is smaller than the datamodule's "
                f"({data_vocab}): build the generator with vocab_size={data_vocab}."
            )
        # kept out of the module's state_dict: the oracle and the references belong to the data, not the model
        oracle = getattr(datamodule, "oracle", None)
        if oracle is not None and self.nll_oracle is None:
            self.__dict__["nll_oracle"] = NLLOracle(oracle)
        references = getattr(datamodule, "bleu_references", None)
        if references and self.bleu is None and self.cfg.bleu_samples:
            texts = [" ".join(words) if not isinstance(words, str) else words for words in references]
            self.__dict__["bleu"] = HeldOutBLEU(texts, n_gram=self.cfg.bleu_n_gram)
            self._decode = datamodule.decode  # type: ignore[union-attr]

    def on_fit_start(self) -> None:
        for metric in (self.nll_oracle, self.bleu):
            if metric is not None:
                metric.to(self.device)
        if not self.history:  # the untrained generator, for reference
            row = self._evaluate()
            if row:
                self.history.append({"phase": "untrained", "epoch": 0, **row})

    def on_fit_end(self) -> None:
        if self.history and self.trainer.is_global_zero:
            print("Evaluation of G (NLL-oracle: per token, lower is better; BLEU: higher is better):")
            for row in self.history:
                figures = "  ".join(f"{name} {row[name]:.3f}" for name in ("nll_oracle", "bleu") if name in row)
                print(f"  {row['phase']:>12} epoch {row['epoch']:>4}: {figures}")

    def configure_optimizers(self) -> Any:
        hp = self.cfg
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=hp.g_lr)
        on_cuda = self._trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        d_opt = torch.optim.Adam(
            self.discriminator.parameters(), lr=hp.d_lr, fused=bool(hp.cuda_graphs and on_cuda) or None
        )
        self._d_update = None
        return [g_opt, d_opt]

    def _optimizers(self) -> tuple[Any, Any]:
        g_opt, d_opt = cast(list, self.optimizers())
        return g_opt, d_opt

    def train(self, mode: bool = True) -> SeqGANModule:
        super().train(mode)
        if self.rollout_policy is not None:
            self.rollout_policy.eval()
        return self

    # ------------------------------------------------------------------ the schedule
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        real = batch["tokens"]  # (B, T)
        phase = self.schedule["phase"]
        if phase == "mle":
            self._mle_step(real)
        elif phase == "d_pretrain":
            self._d_step(real)
        elif phase == "adversarial":
            if self.schedule["unit"] < self.cfg.g_steps:
                self._g_step(self.cfg.g_batch_size or real.shape[0])
            else:
                self._d_step(real)
        self._advance(real.shape[0])
        if self.schedule["phase"] == "done":
            self.trainer.should_stop = True

    def _batches_per_epoch(self) -> int:
        return int(self.trainer.num_training_batches)

    def _advance(self, batch_size: int) -> None:
        """Move the cursor one unit; start the next epoch / round / phase when one ends."""
        hp, s = self.cfg, self.schedule
        per_epoch = self._batches_per_epoch()
        if s["phase"] == "adversarial" and s["unit"] < hp.g_steps:
            s["unit"] += 1
            if s["unit"] == hp.g_steps:
                update_rollout_policy(self.rollout_policy, self.generator, hp.rollout_update_rate)
            return
        s["batch"] += 1
        if s["batch"] < per_epoch:
            return
        s["batch"] = 0
        if s["phase"] == "mle":
            s["epoch"] += 1
            self._maybe_evaluate(last=s["epoch"] == hp.mle_epochs)
            if s["epoch"] == hp.mle_epochs:
                self._enter(_next_phase("mle", hp))
            return
        # a D epoch ended
        s["unit"] += 1
        d_units = hp.d_epochs if s["phase"] == "d_pretrain" else hp.g_steps + hp.d_steps * hp.d_epochs
        if s["phase"] == "adversarial" and s["unit"] < d_units and (s["unit"] - hp.g_steps) % hp.d_epochs == 0:
            self.negatives = None  # the next d-step samples fresh negatives
        if s["unit"] < d_units:
            return
        s["unit"], s["epoch"] = 0, s["epoch"] + 1
        self.negatives = None
        total = hp.d_pretrain_rounds if s["phase"] == "d_pretrain" else hp.adv_epochs
        if s["phase"] == "adversarial":
            self._maybe_evaluate(last=s["epoch"] == total)
        if s["epoch"] == total:
            self._enter(_next_phase(s["phase"], hp))

    def _enter(self, phase: str) -> None:
        self.schedule.update(phase=phase, epoch=0, unit=0, batch=0)
        self.negatives = None
        if phase == "adversarial":
            self.rollout_policy.load_state_dict(self.generator.state_dict())  # start from the pretrained G
            if self.cfg.reset_g_optimizer:
                g_opt, _ = self._optimizers()
                g_opt.optimizer.state.clear()  # Adam's moments restart for the policy-gradient updates

    # ------------------------------------------------------------------ the updates
    def _mle_step(self, real: torch.Tensor) -> None:
        g_opt, _ = self._optimizers()
        losses = []
        for rows in real.split(self.cfg.g_batch_size or real.shape[0]):
            logits = self.generator(rows)  # (b, T, V)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows.reshape(-1))
            self._g_update(g_opt, loss)
            losses.append(loss.detach())
        self.log("g/mle_loss", torch.stack(losses).mean(), prog_bar=True)

    def _g_step(self, batch_size: int) -> None:
        g_opt, _ = self._optimizers()
        samples = self.generator.sample(batch_size)  # (B, T)
        rewards = monte_carlo_rewards(
            self.rollout_policy,
            self.discriminator,
            samples,
            self.cfg.rollout_num,
            chunk_size=self.cfg.d_chunk_size,
        )  # (B, T)
        baseline = rewards.mean() if self.cfg.pg_baseline else None
        loss = policy_gradient_loss(
            self.generator(samples), samples, rewards, baseline, reduction=self.cfg.pg_reduction
        )
        self._g_update(g_opt, loss)
        self.log_dict({"g/pg_loss": loss, "g/mean_reward": rewards.mean()})

    def _g_update(self, g_opt: Any, loss: torch.Tensor) -> None:
        g_opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(g_opt, gradient_clip_val=self.cfg.g_clip, gradient_clip_algorithm="norm")
        g_opt.step()

    def _d_step(self, real: torch.Tensor) -> None:
        _, d_opt = self._optimizers()
        fake = self._negative_batch(real.shape[0])
        tokens = torch.cat([real, fake])  # (2B, T)
        labels = torch.cat([real.new_ones(real.shape[0]), fake.new_zeros(fake.shape[0])])  # 1 = real
        order = torch.randperm(tokens.shape[0], device=tokens.device)  # real and fake rows mixed
        tokens, labels = tokens[order], labels[order]  # one gather; each update reads a slice of it
        size = self.cfg.d_batch_size or real.shape[0]
        sums = [tokens.new_zeros((), dtype=torch.float) for _ in range(2)]  # rows × (loss, accuracy)
        for x, y in zip(tokens.split(size), labels.split(size)):
            if self.cfg.cuda_graphs:
                if self._d_update is None:
                    self._d_update = GraphedUpdate(self._d_loss, d_opt.optimizer, module=self.discriminator)
                update = self._d_update if len(x) == size else self._d_update.eager  # the graph holds full ones
                _, loss, accuracy = update(x, y)
                d_opt._on_before_step()  # count the update in trainer.global_step, as LightningOptimizer.step does
                d_opt._on_after_step()
            else:
                total, loss, accuracy = self._d_loss(x, y)
                d_opt.zero_grad()
                self.manual_backward(total)
                d_opt.step()
            # read now (a replayed graph overwrites its outputs), in one kernel: this runs ~986,000 times
            torch._foreach_add_(sums, [loss, accuracy], alpha=len(x))
        self.log_dict({"d/loss": sums[0] / len(tokens), "d/accuracy": sums[1] / len(tokens)})

    def _d_loss(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return discriminator_loss(self.discriminator, tokens, labels)

    def _negative_batch(self, size: int) -> torch.Tensor:
        """The next ``size`` negatives of this D round; a fresh pool of one epoch's worth is sampled first."""
        s = self.schedule
        if self.negatives is None:
            count = self._batches_per_epoch() * size
            self.negatives = torch.cat([self.generator.sample(min(4096, count - i)) for i in range(0, count, 4096)])
        start = (s["batch"] * size) % self.negatives.shape[0]
        return self.negatives[start : start + size].to(self.device)

    def _maybe_evaluate(self, last: bool) -> None:
        """Evaluate G every ``eval_every`` epochs of a phase, and after its last epoch."""
        s, hp = self.schedule, self.cfg
        if s["epoch"] % hp.eval_every and not last:
            return
        row = self._evaluate()
        if row:
            self.history.append({"phase": s["phase"], "epoch": s["epoch"], **row})
            self.log_dict(row, prog_bar=True)

    def _evaluate(self) -> dict[str, float]:
        row = {}
        if self.nll_oracle is not None and self.cfg.nll_samples:
            row["nll_oracle"] = self.evaluate_nll_oracle(self.cfg.nll_samples)
        if self.bleu is not None:
            row["bleu"] = self.evaluate_bleu(self.cfg.bleu_samples)
        return row

    @torch.no_grad()
    def evaluate_nll_oracle(self, num_samples: int) -> float:
        """NLL-oracle of ``num_samples`` sequences sampled from G (needs the datamodule's oracle)."""
        if self.nll_oracle is None:
            raise ConfigurationError("NLL-oracle needs an oracle: train with an OracleDataModule.")
        self.nll_oracle.reset()
        for start in range(0, num_samples, 4096):
            self.nll_oracle.update(self.generator.sample(min(4096, num_samples - start)))
        return float(self.nll_oracle.compute())

    @torch.no_grad()
    def evaluate_bleu(self, num_samples: int) -> float:
        """BLEU of ``num_samples`` texts sampled from G against the held-out lines (needs a text datamodule)."""
        if self.bleu is None or self._decode is None:
            raise ConfigurationError("BLEU needs held-out text: train with a TextLinesDataModule.")
        self.bleu.reset()
        for start in range(0, num_samples, 4096):
            self.bleu.update(self._decode(self.generator.sample(min(4096, num_samples - start))))
        return float(self.bleu.compute())

    # ------------------------------------------------------------------ exact resume
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["seqgan"] = {
            "schedule": dict(self.schedule),
            "negatives": self.negatives,
            "history": list(self.history),
        }
        self._random_state.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("seqgan", {})
        self.schedule = dict(state.get("schedule", self.schedule))
        self.negatives = state.get("negatives")
        self.history = list(state.get("history", []))
        self._random_state.load(checkpoint)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._random_state.restore()


def _build(source: NetworkSource) -> nn.Module:
    if isinstance(source, nn.Module):
        return source
    network = source()
    if not isinstance(network, nn.Module):
        raise ConfigurationError(f"a network factory must return an nn.Module, got {type(network).__name__}.")
    return network


def _first_phase(mle_epochs: int, d_rounds: int, adv_epochs: int) -> str:
    for phase, count in (("mle", mle_epochs), ("d_pretrain", d_rounds), ("adversarial", adv_epochs)):
        if count > 0:
            return phase
    return "done"


def _next_phase(phase: str, hp: Any) -> str:
    counts = {"mle": hp.mle_epochs, "d_pretrain": hp.d_pretrain_rounds, "adversarial": hp.adv_epochs}
    for later in PHASES[PHASES.index(phase) + 1 : -1]:
        if counts[later] > 0:
            return later
    return "done"
