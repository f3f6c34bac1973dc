"""Pruning: schedule, methods (unstructured, structured, heads, N:M), targets, masks through training, resume,
export, strategies, 2:4 conversion and argument errors."""

from __future__ import annotations

import copy
import glob
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from lit_bigmodel import ConfigurationError, SFTModule
from lit_bigmodel.callbacks.pruning import Pruning, to_semi_structured
from lit_bigmodel.datamodules import ArithmeticDataModule
from tests.conftest import tiny_trainer


def _gpt2_config(**overrides):
    settings = dict(n_layer=2, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**settings, **overrides})


def _data():
    return ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=16, eval_batch_size=20, seed=3)


def _fit(root, pruning, max_steps, callbacks=(), ckpt_path=None, **trainer_kwargs):
    L.seed_everything(1)
    module = SFTModule(_gpt2_config(), learning_rate=3e-3, warmup_steps=2)  # AdamW, weight decay 0.01
    trainer = tiny_trainer(
        root,
        max_steps=max_steps,
        callbacks=[pruning, *callbacks],
        limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        **trainer_kwargs,
    )
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, trainer


def _randomized(model):
    """Every parameter random (no exact zeros), so any zero written by pruning shows."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param))
    return model


def _linear_view(module):
    return module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()  # (out, in)


# ---------------------------------------------------------------------------------------------- schedule
def test_cubic_schedule_follows_zhu_and_gupta_on_a_grid_of_optimizer_steps():
    pruning = Pruning(final_sparsity=0.8, initial_sparsity=0.1, start_step=10, end_step=50, frequency=10)
    assert pruning.target_sparsity(9) == 0.0
    assert pruning.target_sparsity(10) == pytest.approx(0.1)
    assert pruning.target_sparsity(30) == pytest.approx(0.8 + (0.1 - 0.8) * (1 - 20 / 40) ** 3)
    assert pruning.target_sparsity(39) == pruning.target_sparsity(30)  # held between two mask updates
    assert pruning.target_sparsity(50) == pytest.approx(0.8)
    assert pruning.target_sparsity(10_000) == pytest.approx(0.8)
    one_shot = Pruning(final_sparsity=0.3, schedule="one_shot", start_step=5)
    assert (one_shot.target_sparsity(4), one_shot.target_sparsity(5), one_shot.target_sparsity(99)) == (0.0, 0.3, 0.3)


def test_select_smallest_is_exact_with_ties_within_and_across_tensors():
    from lit_bigmodel.callbacks._pruning_methods import select_smallest

    generator = torch.Generator().manual_seed(0)
    for size, k in [(1, 0), (1, 1), (50, 17), (300, 150), (300, 299), (301, 300)]:
        keys = torch.randint(0, 12, (size,), generator=generator, dtype=torch.int32)  # many ties
        expected = torch.zeros(size, dtype=torch.bool)
        expected[torch.sort(keys, stable=True).indices[:k]] = True  # ties: earliest position first
        assert torch.equal(select_smallest([keys], k)[0], expected), (size, k)
        pieces = select_smallest([keys[: size // 3], keys[size // 3 :]], k)  # bisection path
        assert torch.equal(torch.cat(pieces), expected), (size, k)


# ---------------------------------------------------------------------------------------------- training
class _MaskProbe(L.Callback):
    """Before every forward: pruned weights are exactly zero; records the measured sparsity per optimizer step."""

    def __init__(self, pruning):
        self.pruning = pruning
        self.sparsity = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for target in self.pruning.targets:
            mask = self.pruning.masks.get(target.name)
            if mask is not None:
                assert not target.weight[~mask].any(), f"{target.name} moved at step {trainer.global_step}"
        self.sparsity[trainer.global_step] = self.pruning.measure_sparsity()["global"]


def test_gradual_pruning_reaches_the_target_counted_from_weights_with_accumulation(tmp_path):
    pruning = Pruning(
        final_sparsity=0.6, initial_sparsity=0.1, start_step=1, end_step=5, frequency=2, make_permanent_at_end=False
    )
    probe = _MaskProbe(pruning)
    _, trainer = _fit(tmp_path, pruning, 7, callbacks=[probe], accumulate_grad_batches=2, log_every_n_steps=4)
    assert trainer.global_step == 7 and set(probe.sparsity) == set(range(7))
    # the schedule counts optimizer steps, not batches; zeros track it at every step
    for step, measured in probe.sparsity.items():
        assert measured == pytest.approx(pruning.target_sparsity(step), abs=2e-3), step
    assert probe.sparsity[2] == pytest.approx(pruning.target_sparsity(1), abs=2e-3)  # held between updates
    assert probe.sparsity[3] > probe.sparsity[2] > 0
    measured = pruning.measure_sparsity()
    assert measured["global"] == pytest.approx(0.6, abs=0.005)
    names = {t.module_name for t in pruning.targets}
    assert names == {
        f"model.transformer.h.{i}.{p}" for i in (0, 1) for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert all(measured[name] == pytest.approx(0.6, abs=0.005) for name in names)
    # logged from the weights, globally and per layer
    logged = trainer.callback_metrics
    assert float(logged["pruning/sparsity"]) == pytest.approx(measured["global"], abs=1e-6)
    assert float(logged["pruning/sparsity/model.transformer.h.1.mlp.c_fc"]) == pytest.approx(
        measured["model.transformer.h.1.mlp.c_fc"], abs=1e-6
    )


def test_pruned_weights_are_zero_at_every_forward_even_with_momentum_and_weight_decay(tmp_path):
    """One-shot before the first step; AdamW would move the zeros if the callback did not re-mask them."""
    pruning = Pruning("structured", final_sparsity=0.25, schedule="one_shot", make_permanent_at_end=False)
    probe = _MaskProbe(pruning)
    _, trainer = _fit(tmp_path, pruning, 6, callbacks=[probe])
    assert set(probe.sparsity) == set(range(6))
    assert all(value == pytest.approx(0.25, abs=0.01) for value in probe.sparsity.values())
    optimizer = trainer.optimizers[0]
    pruned = [~pruning.masks[t.name] for t in pruning.targets]
    moments = [optimizer.state[t.weight]["exp_avg"][mask] for t, mask in zip(pruning.targets, pruned)]
    assert any(m.abs().sum() > 0 for m in moments)  # the optimizer did push the pruned weights; they stayed zero
    assert all(not t.weight[mask].any() for t, mask in zip(pruning.targets, pruned))


def test_gradual_n_m_in_training_then_make_permanent_drops_masks_and_hooks(tmp_path):
    pruning = Pruning("n:m", start_step=0, end_step=2, frequency=1)  # 2:4, make_permanent_at_end=True
    _, trainer = _fit(tmp_path, pruning, 3)
    assert pruning.masks == {} and pruning.state_dict()["permanent"] is True
    assert not trainer.optimizers[0]._optimizer_step_post_hooks
    assert pruning.measure_sparsity()["global"] == 0.5  # the zeros stay in the weights
    for target in pruning.targets:
        weight = target.out_in(target.weight.detach())  # (out, in)
        assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all(), target.name


def test_resume_mid_schedule_gives_the_same_masks_and_sparsity(tmp_path):
    class Snapshot(L.Callback):
        def __init__(self, pruning):
            self.pruning, self.masks = pruning, {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.masks.setdefault(trainer.global_step, {k: v.clone() for k, v in self.pruning.masks.items()})

    def pruning():
        return Pruning(final_sparsity=0.7, start_step=1, end_step=7, frequency=3, make_permanent_at_end=False)

    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    full_pruning = pruning()
    full_snapshot = Snapshot(full_pruning)
    full, _ = _fit(tmp_path / "a", full_pruning, 10, callbacks=[saver, full_snapshot])  # an epoch is 9 steps
    mid = glob.glob(str(tmp_path / "ckpt" / "*step=3.ckpt"))
    assert mid, os.listdir(tmp_path / "ckpt")
    state = torch.load(mid[0], weights_only=False)["callbacks"][full_pruning.state_key]
    assert state["last_update"] == 1 and len(state["masks"]) == 8  # saved between the updates at steps 1 and 4

    resumed_pruning = pruning()
    resumed_snapshot = Snapshot(resumed_pruning)
    resumed, _ = _fit(tmp_path / "b", resumed_pruning, 10, callbacks=[resumed_snapshot], ckpt_path=mid[0])
    assert min(resumed_snapshot.masks) == 3
    for step, masks in resumed_snapshot.masks.items():  # restored at step 3, then every update identical
        assert masks.keys() == full_snapshot.masks[step].keys()
        assert all(torch.equal(masks[k], full_snapshot.masks[step][k]) for k in masks), step
    assert all(torch.equal(resumed_pruning.masks[k], m) for k, m in full_pruning.masks.items())
    assert resumed_pruning.measure_sparsity() == full_pruning.measure_sparsity()
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_masks_from_a_checkpoint_are_restored_and_applied_at_fit_start():
    from lit_bigmodel.callbacks._pruning_methods import pack_mask

    module = SFTModule(_gpt2_config())
    module.configure_model()
    _randomized(module)
    name = "model.transformer.h.0.mlp.c_fc.weight"
    weight = module.get_parameter(name)
    before = weight.detach().clone()
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.3
    state = {"masks": {name: pack_mask(mask)}, "shapes": {name: list(mask.shape)}, "last_update": 0}
    pruning = Pruning(schedule="one_shot", start_step=0)
    pruning.load_state_dict(state)
    pruning.on_fit_start(SimpleNamespace(estimated_stepping_batches=10), module)
    assert torch.equal(pruning.masks[name], mask)
    assert torch.equal(weight.detach(), before * mask)  # applied to the (dense) weights it meets
    assert pruning.state_dict()["masks"][name].numel() == (mask.numel() + 7) // 8  # 8 weights a byte

    bad = {"masks": {name: pack_mask(mask), "model.nope.weight": pack_mask(mask)}, "shapes": {name: [3, 4]}}
    bad["shapes"]["model.nope.weight"] = list(mask.shape)
    pruning = Pruning()
    pruning.load_state_dict(bad)
    with pytest.raises(ConfigurationError) as error:
        pruning.on_fit_start(SimpleNamespace(estimated_stepping_batches=10), module)
    assert "do not fit the model: 'model.nope.weight' (not a pruning target now)" in str(error.value)
    assert f"{name!r} (shape (3, 4) in the checkpoint, (32, 128) now)" in str(error.value)


def test_state_key_separates_two_instances():
    first, second = Pruning(include="mlp"), Pruning(include="attn")
    assert first.state_key != second.state_key


def test_pattern_matching_nothing_fails_at_fit_start(tmp_path):
    with pytest.raises(ConfigurationError, match=r"`include` pattern 'nope' matches no .*`exclude` pattern 'lm_headx'"):
        _fit(tmp_path, Pruning(include=["mlp", "nope"], exclude="lm_headx"), 2)
    with pytest.raises(
        ConfigurationError, match=r"`end_step` must be after `start_step`; they resolve to steps 1 and 10"
    ):
        _fit(tmp_path, Pruning(start_step=10, end_step=0.1), 14)


# ---------------------------------------------------------------------------------------------- methods
def test_norms_biases_embeddings_untouched_and_tied_head_skipped():
    model = _randomized(GPT2LMHeadModel(_gpt2_config()))
    before = copy.deepcopy(model.state_dict())
    pruning = Pruning(final_sparsity=0.5)
    sparsity = pruning.prune_module(model)
    conv_weights = {
        f"transformer.h.{i}.{p}.weight"
        for i in (0, 1)
        for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    for name, tensor in model.state_dict().items():
        if name in conv_weights:
            assert (tensor == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3), name
        else:
            assert torch.equal(tensor, before[name]), name  # norms, biases, embeddings, the tied lm_head
    assert sparsity["global"] == pytest.approx(0.5, abs=1e-4)
    assert "lm_head" not in sparsity

    # with prune_embeddings the shared wte / lm_head tensor is pruned once and stays tied
    model = _randomized(GPT2LMHeadModel(_gpt2_config()))
    sparsity = Pruning(final_sparsity=0.5, prune_embeddings=True).prune_module(model)
    assert {"transformer.wte", "transformer.wpe"} <= set(sparsity) and "lm_head" not in sparsity
    assert model.lm_head.weight is model.transformer.wte.weight
    assert (model.lm_head.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)


def test_global_scope_uses_one_magnitude_threshold_across_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[2].weight.mul_(10)  # a layer of large weights loses far fewer of them
    original = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    unpruned = copy.deepcopy(model)
    sparsity = Pruning(final_sparsity=0.5, scope="global").prune_module(model)
    assert sparsity["global"] == pytest.approx(0.5, abs=1e-9)  # exactly half of 1,536 weights
    assert sparsity["0"] > 0.6 > 0.1 > sparsity["2"]
    pruned = torch.cat([o[w == 0].abs() for o, w in zip(original, (model[0].weight, model[2].weight))])
    kept = torch.cat([o[w != 0].abs() for o, w in zip(original, (model[0].weight, model[2].weight))])
    assert pruned.max() <= kept.min()
    layer = Pruning(final_sparsity=0.5).prune_module(unpruned)
    assert layer["0"] == pytest.approx(0.5, abs=1e-3) and layer["2"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize(("norm", "pruned_row"), [(1, 1), (2, 0)])
def test_structured_prunes_whole_output_rows_by_l1_or_l2_norm(kind, norm, pruned_row):
    weight = torch.full((6, 8), 5.0)  # (out, in)
    weight[0] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0, 0, 0, 0])  # L1 2.0, L2 1.0
    weight[1] = torch.tensor([1.5, 0, 0, 0, 0, 0, 0, 0])  # L1 1.5, L2 1.5
    layer = nn.Linear(8, 6) if kind == "linear" else Conv1D(6, 8)
    with torch.no_grad():
        layer.weight.copy_(weight if kind == "linear" else weight.t())
        layer.bias.normal_()
    Pruning("structured", final_sparsity=1 / 6, pruning_norm=norm).prune_module(layer)
    view = _linear_view(layer)
    zero_rows = [r for r in range(6) if not view[r].any()]
    assert zero_rows == [pruned_row]
    assert layer.bias.abs().sum() > 0  # the bias stays


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_structured_input_columns(kind):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16)
    with torch.no_grad():
        layer.weight.normal_()
    Pruning("structured", final_sparsity=0.25, structured_dim="inputs").prune_module(layer)
    view = _linear_view(layer)
    assert int((~view.any(dim=0)).sum()) == 4 and int((~view.any(dim=1)).sum()) == 0


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4)])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_n_m_keeps_the_n_largest_of_every_m_inputs(kind, n, m):
    torch.manual_seed(0)
    layer = nn.Linear(16, 8) if kind == "linear" else Conv1D(8, 16)
    with torch.no_grad():
        layer.weight.normal_()
    original = _linear_view(layer).clone()
    sparsity = Pruning("n:m", n=n, m=m, schedule="one_shot").prune_module(layer)
    assert sparsity["global"] == pytest.approx(1 - n / m)
    groups, before = _linear_view(layer).reshape(8, 4, m), original.reshape(8, 4, m)
    assert ((groups != 0).sum(-1) == n).all()
    largest = before.abs().topk(n, dim=-1).indices
    assert torch.equal(torch.gather(groups, -1, largest), torch.gather(before, -1, largest))


def test_gradual_n_m_stays_within_the_pattern():
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    sparsity = Pruning("n:m").prune_module(layer, sparsity=0.25)  # half-way to 2:4
    assert sparsity["global"] == pytest.approx(0.25)
    assert ((layer.weight == 0).view(32, 16, 4).sum(-1) <= 2).all()
    with pytest.raises(ConfigurationError, match=r"`sparsity` must be in \[0, 0.5\], got 0.6"):
        Pruning("n:m").prune_module(layer, sparsity=0.6)


def _bert():
    return BertModel(BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    ))  # fmt: skip


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    ))  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_head_pruning_removes_whole_heads_exactly(family):
    """Pruned heads: q/k/v rows and output-projection columns zeroed; the outputs equal those of a model
    whose heads are removed by zeroing the output-projection columns alone (the reference)."""
    model = {"gpt2": lambda: GPT2LMHeadModel(_gpt2_config(n_head=4)), "bert": _bert, "llama": _llama}[family]()
    model = _randomized(model).eval()
    with torch.no_grad():
        for module in model.modules():  # keep the random network numerically tame
            if isinstance(module, (nn.Linear, Conv1D)):
                module.weight.mul_(0.1)
    reference = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    sparsity = Pruning("heads", final_sparsity=0.5).prune_module(model)
    head_dim = 8
    if family == "gpt2":
        layers = [(f"transformer.h.{i}.attn", ["c_attn"], "c_proj") for i in range(2)]
    elif family == "bert":
        layers = [
            (f"encoder.layer.{i}.attention", ["self.query", "self.key", "self.value"], "output.dense") for i in range(2)
        ]
    else:  # grouped-query attention: key / value heads are shared and stay
        layers = [(f"model.layers.{i}.self_attn", ["q_proj"], "o_proj") for i in range(2)]
    for prefix, qkv, out in layers:
        out_view = _linear_view(model.get_submodule(f"{prefix}.{out}"))  # (E, heads * head_dim)
        heads = [h for h in range(4) if not out_view[:, h * head_dim : (h + 1) * head_dim].any()]
        assert len(heads) == 2, prefix
        for h in heads:
            rows = slice(h * head_dim, (h + 1) * head_dim)
            if family == "gpt2":  # fused q | k | v along the outputs of c_attn
                fused = _linear_view(model.get_submodule(f"{prefix}.c_attn"))
                assert all(
                    not fused[offset + h * head_dim : offset + (h + 1) * head_dim].any() for offset in (0, 32, 64)
                )
            else:
                assert all(not _linear_view(model.get_submodule(f"{prefix}.{name}"))[rows].any() for name in qkv)
            with torch.no_grad():
                _linear_view(reference.get_submodule(f"{prefix}.{out}"))[:, rows] = 0
        assert sparsity[f"{prefix}.{out}"] == pytest.approx(0.5)
    for name, tensor in model.state_dict().items():
        if name.endswith("bias") or "norm" in name.lower() or "k_proj" in name or "v_proj" in name:
            assert torch.equal(tensor, before[name]), name
    inputs = {"input_ids": torch.randint(0, 64, (2, 10))}
    with torch.no_grad():
        ours, theirs = model(**inputs), reference(**inputs)
    key = "logits" if family != "bert" else "last_hidden_state"
    assert torch.allclose(ours[key], theirs[key], atol=1e-5)
    unpruned = copy.deepcopy(model)
    unpruned.load_state_dict(before)
    with torch.no_grad():
        assert not torch.allclose(ours[key], unpruned(**inputs)[key], atol=1e-3)  # the heads did matter


# ---------------------------------------------------------------------------------------------- export
def test_export_reloads_with_its_zeros_and_the_tie(tmp_path, char_tokenizer):
    module = SFTModule(_gpt2_config(), tokenizer=char_tokenizer)
    module.configure_model()
    Pruning(final_sparsity=0.5, prune_embeddings=True).prune_module(module)
    reloaded = AutoModelForCausalLM.from_pretrained(module.export(tmp_path / "pruned"))
    ours = module.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, ours[name]), name
    assert (reloaded.transformer.h[0].mlp.c_fc.weight == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.transformer.wte.weight.data_ptr()


# ---------------------------------------------------------------------------------------------- strategies
def test_sharded_strategies_are_refused_in_setup_and_ddp_is_accepted():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    pruning = Pruning()
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy), ModelParallelStrategy()):
        with pytest.raises(ConfigurationError, match=f"Pruning does not support {type(strategy).__name__}"):
            pruning.setup(SimpleNamespace(strategy=strategy), None, "fit")
    pruning.setup(SimpleNamespace(strategy=DDPStrategy()), None, "fit")


@pytest.mark.multiprocess
def test_two_process_ddp_gloo(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    script = root / "tests" / "scripts" / "ddp_pruning.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["masks"] == ranks[1]["masks"]  # computed on each rank, identical without communication
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["sparsity"] == pytest.approx(0.5, abs=0.005)
    assert ranks[0]["first_prompt"] != ranks[1]["first_prompt"]


# ---------------------------------------------------------------------------------------------- 2:4 inference
def test_to_semi_structured_names_every_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 40), nn.ReLU(), nn.Linear(40, 64))
    Pruning("n:m", schedule="one_shot", include=r"^0$").prune_module(model)
    with pytest.raises(ConfigurationError) as error:
        to_semi_structured(model)
    message = str(error.value)
    assert "'0' is torch.float32; use float16 or bfloat16" in message
    assert "'2'" not in message  # dense: left alone
    if not torch.cuda.is_available():
        assert "needs a CUDA GPU" in message
    with pytest.raises(ConfigurationError, match="no 2:4-sparse Linear / Conv1D layer"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))
    half = copy.deepcopy(model).half()
    with pytest.raises(ConfigurationError, match=r"'0' is 40 x 64 \(out x in\); both must be multiples of"):
        to_semi_structured(half)


@pytest.mark.gpu
def test_to_semi_structured_matches_the_dense_output_on_gpu():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs compute capability >= 8.0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.GELU(), Conv1D(128, 256))
    Pruning("n:m", schedule="one_shot").prune_module(model)
    model = model.half().cuda().eval()
    x = torch.randn(64, 128, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        dense = model(x)
        assert to_semi_structured(model) == ["0", "2"]
        sparse = model(x)
    assert isinstance(model[2], nn.Linear)
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    assert torch.allclose(dense, sparse, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"final_sparsity": 1.0}, "`final_sparsity` must be in [0, 1), got 1.0."),
        ({"final_sparsity": -0.1}, "`final_sparsity` must be in [0, 1), got -0.1."),
        (
            {"initial_sparsity": 0.6, "final_sparsity": 0.5},
            "`initial_sparsity` must be <= `final_sparsity` (0.5), got 0.6.",
        ),
        ({"method": "n:m", "n": 4, "m": 2}, "`n` and `m` must be integers with 1 <= n < m"),
        (
            {"method": "n:m", "final_sparsity": 0.3},
            "`final_sparsity` must be 1 - n/m = 0.5 (or None) with method='n:m'",
        ),
        ({"start_step": 100, "end_step": 50}, "`end_step` must be after `start_step` (100), got 50."),
        ({"start_step": 0.5, "end_step": 0.2}, "`end_step` must be after `start_step` (0.5), got 0.2."),
        ({"start_step": -1}, "`start_step` must be an int >= 0 (optimizer steps) or a float in [0, 1]"),
        ({"end_step": 1.5}, "`end_step` must be an int >= 0 (optimizer steps) or a float in [0, 1]"),
        ({"frequency": 0}, "`frequency` must be an int >= 1 (optimizer steps), got 0."),
        ({"method": "random"}, "`method` must be one of ('unstructured', 'structured', 'heads', 'n:m'), got 'random'."),
        ({"schedule": "linear"}, "`schedule` must be one of ('cubic', 'one_shot'), got 'linear'."),
        (
            {"scope": "global", "method": "heads"},
            "`scope='global'` is only for method='unstructured', got method='heads'.",
        ),
        ({"scope": "model"}, "`scope` must be one of ('layer', 'global'), got 'model'."),
        ({"structured_dim": "rows"}, "`structured_dim` must be one of ('outputs', 'inputs'), got 'rows'."),
        ({"pruning_norm": 3}, "`pruning_norm` must be 1 or 2, got 3."),
        (
            {"prune_embeddings": True, "method": "structured"},
            "`prune_embeddings=True` is only for method='unstructured'",
        ),
        ({"include": "("}, "`include` must hold regular expressions, got '('"),
        ({"final_sparsity": float("nan")}, "`final_sparsity` must be in [0, 1), got nan."),
        ({"final_sparsity": "0.5"}, "`final_sparsity` must be in [0, 1), got '0.5'."),
        ({"initial_sparsity": float("inf")}, "`initial_sparsity` must be in [0, 1), got inf."),
        ({"initial_sparsity": None}, "`initial_sparsity` must be in [0, 1), got None."),
        ({"start_step": float("nan")}, "`start_step` must be an int >= 0 (optimizer steps) or a float in [0, 1]"),
        ({"end_step": float("inf")}, "`end_step` must be an int >= 0 (optimizer steps) or a float in [0, 1]"),
        ({"frequency": float("inf")}, "`frequency` must be an int >= 1 (optimizer steps), got inf."),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ConfigurationError) as error:
        Pruning(**kwargs)
    assert message in str(error.value)
    assert isinstance(error.value, ValueError)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ConfigurationError) as error:
        Pruning(final_sparsity=1.5, frequency=0, schedule="never")
    assert all(f"`{name}`" in str(error.value) for name in ("final_sparsity", "frequency", "schedule"))


def test_n_m_layer_with_an_input_size_not_a_multiple_of_m_is_named():
    with pytest.raises(ConfigurationError, match=r"layer '1' has 6 input features, not a multiple of m=4"):
        Pruning("n:m").prune_module(nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4)))
