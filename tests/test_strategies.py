"""Sharding presets, CPU versions of FSDP / DeepSpeed, export from sharded runs (live and offline).

The 2-process tests (marker ``multiprocess``) run every module under ddp, FSDP, FSDP2 and DeepSpeed
ZeRO-2 / ZeRO-3 on CPU with gloo, through ``tests/scripts/sharded.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from lit_bigmodel import SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule
from lit_bigmodel.errors import ConfigurationError, MissingPathError, OutputExistsError
from lit_bigmodel.export import export_checkpoint, load_consolidated
from lit_bigmodel.strategies import (
    CPUDeepSpeedStrategy,
    CPUFSDPStrategy,
    FSDP2Strategy,
    TransformerBlockPolicy,
    deepspeed_strategy,
    fsdp2_strategy,
    fsdp_strategy,
    no_split_module_names,
)

ROOT = Path(__file__).resolve().parents[1]
PROBE = torch.tensor([[3, 4, 1, 5, 6, 2, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]])


def _gpt2(n_layer: int = 2) -> GPT2Config:
    return GPT2Config(
        n_layer=n_layer, n_embd=32, n_head=2, n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )


# ---------------------------------------------------------------------------------------------- presets
def test_fsdp_preset_wraps_transformer_blocks_and_picks_the_cpu_version_without_cuda():
    strategy = fsdp_strategy("grad_op", activation_checkpointing=True, accelerator="cpu")
    assert isinstance(strategy, CPUFSDPStrategy)
    assert strategy.sharding_strategy.name == "SHARD_GRAD_OP"
    policy = strategy.kwargs["auto_wrap_policy"]
    model = AutoModelForCausalLM.from_config(_gpt2())
    assert policy(model, recurse=True)  # the root call reads the block names
    assert no_split_module_names(model) == {"GPT2Block"}
    assert policy(model.transformer.h[0], recurse=False)
    assert not policy(model.transformer.wte, recurse=False)


def test_block_policy_without_blocks_says_what_to_pass():
    with pytest.raises(ConfigurationError, match="block_names"):
        TransformerBlockPolicy()(torch.nn.Linear(2, 2), recurse=True)
    assert TransformerBlockPolicy(["Linear"])(torch.nn.Linear(2, 2), recurse=False)


def test_deepspeed_preset_config():
    strategy = deepspeed_strategy(3, offload_optimizer=True, param_persistence_threshold=0, accelerator="cpu")
    assert isinstance(strategy, CPUDeepSpeedStrategy)
    zero = strategy.config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 0
    assert isinstance(fsdp2_strategy(), FSDP2Strategy)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: fsdp_strategy("zero"), "sharding"),
        (lambda: fsdp_strategy(state_dict_type="half"), "state_dict_type"),
        (lambda: fsdp_strategy(accelerator="tpu"), "accelerator"),
        (lambda: deepspeed_strategy(4), "stage"),
        (lambda: deepspeed_strategy(2, offload_parameters=True), "offload_parameters"),
        (lambda: deepspeed_strategy(2, param_persistence_threshold=0), "param_persistence_threshold"),
    ],
)
def test_preset_errors_name_the_argument(make, name):
    with pytest.raises(ConfigurationError, match=f"`{name}`"):
        make()


def test_weight_decay_groups_follow_modules_not_shapes():
    """Sharded parameters are flat 1-D shards, so the decay groups must not depend on ``ndim``."""
    module = SFTModule(_gpt2(), learning_rate=1e-3, weight_decay=0.1)
    module.configure_model()
    trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    module.trainer = trainer
    names = {id(p): n for n, p in module.model.named_parameters()}
    for param in module.model.parameters():  # what ZeRO-3 leaves outside a forward: 1-D shards
        param.data = param.data.reshape(-1)
    groups = module.configure_optimizers()["optimizer"].param_groups
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert "transformer.h.0.attn.c_attn.weight" in decay and "transformer.h.0.mlp.c_proj.weight" in decay
    assert {"transformer.wte.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.attn.c_attn.bias"} <= no_decay


def test_an_empty_group_is_left_out():
    module = SFTModule(lambda: torch.nn.Embedding(8, 4), learning_rate=1e-3)  # nothing decays
    module.configure_model()
    module.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    groups = module.configure_optimizers()["optimizer"].param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_setup_gives_sharded_strategies_what_peft_adapters_need():
    """FSDP1 needs use_orig_params=True for frozen and trainable weights in one unit; DeepSpeed writes the weights
    into its own files, adapter-only with exclude_frozen_parameters (unless full_checkpoints=True)."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=4, target_modules="all-linear")

    def set_up(module, strategy):
        module.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False)
        module.setup("fit")
        return module.trainer.strategy

    assert fsdp_strategy(accelerator="cpu").kwargs["use_orig_params"]  # Lightning's default
    with pytest.warns(UserWarning, match="use_orig_params=True"):
        strategy = set_up(SFTModule(_gpt2(), peft=lora), fsdp_strategy(accelerator="cpu", use_orig_params=False))
    assert strategy.kwargs["use_orig_params"] is True
    strategy = set_up(SFTModule(_gpt2()), fsdp_strategy(accelerator="cpu", use_orig_params=False))
    assert strategy.kwargs["use_orig_params"] is False  # without adapters: as the user asked
    if importlib.util.find_spec("deepspeed") is not None:
        assert set_up(SFTModule(_gpt2(), peft=lora), deepspeed_strategy(3, accelerator="cpu")).exclude_frozen_parameters
        full = SFTModule(_gpt2(), peft=lora, full_checkpoints=True)
        assert not set_up(full, deepspeed_strategy(3, accelerator="cpu")).exclude_frozen_parameters


# ---------------------------------------------------------------------------------------------- offline export
def _trained_checkpoint(tmp_path: Path) -> tuple[Path, SFTModule]:
    L.seed_everything(0)
    module = SFTModule(_gpt2(), learning_rate=1e-2, warmup_steps=0)
    dm = ArithmeticDataModule(max_operand=12, num_val=20, num_test=20, batch_size=8, eval_batch_size=20)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, dm)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, module


def test_offline_export_gives_the_logits_of_the_trained_module(tmp_path):
    path, module = _trained_checkpoint(tmp_path)
    out = export_checkpoint(path, tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=PROBE).logits
        got = reloaded(input_ids=PROBE).logits
    assert (got - expected).abs().max() <= 1e-5
    assert (Path(out) / "tokenizer_config.json").is_file()  # the tokenizer travels in the checkpoint
    with pytest.raises(OutputExistsError):  # checked before anything is loaded
        export_checkpoint(path, tmp_path / "export")


def test_a_gathered_state_dict_keeps_tied_weights_tied(tmp_path):
    """Gathered state dicts hold copies; written as they are, GPT-2's tied LM head would be stored twice."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GPT2Config

    from lit_bigmodel.export import write_pretrained

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=100))
    copies = {key: value.detach().clone() for key, value in model.state_dict().items()}  # as full_state_dict gives
    live = write_pretrained(str(tmp_path / "live"), model)
    gathered = write_pretrained(str(tmp_path / "gathered"), model, state_dict=copies)
    with safe_open(os.path.join(gathered, "model.safetensors"), "pt") as handle:
        assert "lm_head.weight" not in list(handle.keys())
    sizes = [os.path.getsize(os.path.join(path, "model.safetensors")) for path in (live, gathered)]
    assert sizes[0] == sizes[1]


def test_offline_export_errors(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        export_checkpoint(tmp_path / "nothing.ckpt", tmp_path / "out")
    (tmp_path / "folder").mkdir()
    with pytest.raises(MissingPathError, match="not a checkpoint"):
        export_checkpoint(tmp_path / "folder", tmp_path / "out")
    torch.save({"state_dict": {"model.w": torch.zeros(1)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigurationError, match="lit_bigmodel_export"):
        export_checkpoint(tmp_path / "other.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_export_subcommand_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "from lit_bigmodel.cli import main; main()", "export", str(tmp_path / "x"), "out"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().startswith("lit-bigmodel export: error:") and "does not exist" in done.stderr


# ---------------------------------------------------------------------------------------------- 2 processes
STRATEGIES = ["ddp", "fsdp", "fsdp2", "deepspeed_stage_2", "deepspeed_stage_3"]


def _run(kind: str, strategy: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = ROOT / "tests" / "scripts" / "sharded.py"
    return subprocess.run(
        [sys.executable, str(script), kind, strategy, str(out)], env=env, capture_output=True, text=True, timeout=600
    )


def _learning_run(kind: str, strategy: str, tmp_path: Path) -> dict:
    """Run ``tests/scripts/sharded.py`` for ``kind`` under ``strategy`` (2 processes); its report, checked to show
    6 steps on 2 ranks with finite, falling losses."""
    if "deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    done = _run(kind, strategy, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world_size"] == 2 and report["global_step"] == 6
    losses = report["losses"]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it learns
    return report


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["sft", "distill"])
def test_module_trains_under_strategy_and_exports_the_sharded_model(kind, strategy, tmp_path):
    report = _learning_run(kind, strategy, tmp_path)
    assert report["student_checksum"] != report["start"]["student"]
    if kind == "distill":  # the teacher is sharded like the student, never trained
        assert report["teacher_checksum"] == report["start"]["teacher"]
        assert report["teacher_trainable"] == 0 and report["teacher_grads"] == 0
        assert report["teacher_in_optimizer"] == 0
    if strategy == "deepspeed_stage_3":
        assert report["partitioned"] == report["parameters"]  # really sharded
    # live export (collective) == the sharded model's own logits
    assert report["max_abs_dlogit"] <= 1e-5
    if kind == "sft":  # offline export from the sharded checkpoint: the same logits
        out = export_checkpoint(tmp_path / "ckpt", tmp_path / "offline")
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=PROBE).logits
        assert (logits - torch.load(tmp_path / "probe_logits.pt")).abs().max() <= 1e-5


def _lora_fingerprint(base_dir: Path) -> list[float]:
    """The base fingerprint a single-process module takes of ``base_dir`` with the scripts' LoRA config."""
    from peft import LoraConfig

    module = SFTModule(str(base_dir), peft=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    module.configure_model()
    return module._base_fingerprint


# every strategy for SFT and distillation's student; FSDP2 writing one full file (adapter-only) for SFT
LORA_RUNS = [(kind, strategy) for kind in ("sft_lora", "distill_lora") for strategy in STRATEGIES]
LORA_RUNS.append(("sft_lora", "fsdp2_full_state"))


@pytest.mark.multiprocess
@pytest.mark.parametrize(("kind", "strategy"), LORA_RUNS)
def test_lora_trains_exports_and_resumes_under_strategy(kind, strategy, tmp_path):
    """peft LoRA on every linear layer of a saved base, 2 processes: only the adapters train, both exports give
    the sharded model's logits, the checkpoint resumes, and `lit-bigmodel export` rebuilds it offline."""
    pytest.importorskip("peft")
    report = _learning_run(kind, strategy, tmp_path)
    start, end = report["start"]["split"], report["end"]
    assert start["lora_B_abs"] == 0.0  # the adapters start as the identity (ZeRO-3 included)
    assert end["base"] == start["base"]  # the frozen base never moves ...
    assert start["base"] == pytest.approx(report["saved_state_checksum"], rel=1e-12)  # ... and is the saved one
    assert end["adapters"] != start["adapters"] and end["lora_B_abs"] > 0  # the adapters train
    assert report["trainable"] > 0 and report["trainable_not_lora"] == []
    assert report["dtypes"] == ["torch.float32"]
    if kind == "distill_lora":
        assert report["teacher_trainable"] == 0 and report["teacher_lora"] == 0
    # the fingerprint of the frozen base is taken before sharding (never from shards: [] there, no collective)
    sharded = strategy not in ("ddp", "deepspeed_stage_2")
    assert report["fingerprint_live"] == ([] if sharded else report["fingerprint_at_build"])
    if strategy == "deepspeed_stage_3":  # built as partitions: no fingerprint
        assert report["fingerprint_at_build"] == []
    else:
        assert report["fingerprint_at_build"] == pytest.approx(_lora_fingerprint(tmp_path / "base"), rel=1e-9)
    # live exports (collective) == the sharded model's own logits: merged, and the adapter folder on the base
    assert report["max_abs_dlogit"] <= 1e-5
    assert report["adapter_max_abs_dlogit"] <= 1e-5
    # resume: the second fit starts from what the first ended with
    resumed = report["resumed"]
    assert resumed["global_step"] == 8 and len(resumed["losses"]) == 2
    assert resumed["start"]["base"] == pytest.approx(end["base"], rel=1e-12)
    assert resumed["start"]["adapters"] == pytest.approx(end["adapters"], rel=1e-12)
    # the checkpoint: adapter-only, except FSDP / FSDP2 distributed checkpoints (each rank writes its shards)
    full = load_consolidated(tmp_path / "ckpt")
    weights = [key for key in full["state_dict"] if key.startswith("model.")]
    adapter_only = strategy not in ("fsdp", "fsdp2")
    assert ("lit_bigmodel_adapters" in full) == adapter_only
    assert all("lora_" in key for key in weights) == adapter_only
    assert "hyper_parameters" not in full or "peft" not in full["hyper_parameters"]  # loadable with weights_only
    if kind == "sft_lora":  # offline export from the checkpoint: the same logits
        out = export_checkpoint(
            tmp_path / "ckpt", tmp_path / "offline", base=tmp_path / "base" if adapter_only else None
        )
        reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            logits = reloaded(input_ids=PROBE).logits
        assert (logits - torch.load(tmp_path / "probe_logits.pt")).abs().max() <= 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_hidden_state_projections_are_trained_alike_on_every_rank(strategy, tmp_path):
    """The learned student→teacher projections sit outside both networks; FSDP2 has no wrapper that would
    reduce their gradients, so they are sharded like the networks (else each rank trains its own copy)."""
    done = _run("distill_hidden", strategy, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    first, second = report["projection_checksums"]
    assert first == pytest.approx(second, rel=1e-9)
    assert first != pytest.approx(report["projection_start"], rel=1e-6)  # they were trained
    assert report["teacher_checksum"] == report["start"]["teacher"]
    assert report["losses"][-1] < report["losses"][0]


@pytest.mark.multiprocess
def test_zero3_with_cpu_offload_trains_with_deepspeed_cpu_adam_and_exports(tmp_path):
    """DeepSpeed refuses a torch optimizer whose state it offloads: SFTModule picks DeepSpeed's CPU Adam there."""
    pytest.importorskip("deepspeed")
    done = _run("sft", "deepspeed_stage_3_offload", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["optimizer"] == "DeepSpeedCPUAdam"
    assert report["losses"][-1] < report["losses"][0]
    assert report["partitioned"] == report["parameters"]
    assert report["max_abs_dlogit"] <= 1e-5


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_stage_3"])
def test_from_pretrained_in_configure_model_loads_the_weights_when_sharded(strategy, tmp_path):
    """ZeRO-3 builds under deepspeed.zero.Init; without transformers' ZeRO-3 path, loading fails on size-0 params."""
    if "deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    done = _run("sft_pretrained", strategy, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    saved = report["saved_checksum" if strategy == "deepspeed_stage_3" else "saved_state_checksum"]
    tolerance = 1e-12 if strategy == "deepspeed_stage_3" else 1e-9  # FSDP sums the gathered state in another order
    assert report["start"]["student"] == pytest.approx(saved, rel=tolerance)  # the saved weights, not a fresh init
    assert report["losses"][-1] < report["losses"][0]


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    ("kind", "strategy", "message"),
    [
        ("seqgan", "fsdp", "SeqGANModule does not support CPUFSDPStrategy"),
        ("seqgan", "fsdp2", "SeqGANModule does not support FSDP2Strategy"),
        ("seqgan", "deepspeed_stage_2", "allows one"),
        ("seqgan", "deepspeed_stage_3", "allows one"),
        ("sft_early_stopping", "fsdp", "restore_best_weights=False"),
        ("sft_pruning", "deepspeed_stage_3", "Pruning does not support"),
    ],
)
def test_unsupported_strategy_is_refused_at_setup_on_every_rank(kind, strategy, message, tmp_path):
    if "deepspeed" in strategy:
        pytest.importorskip("deepspeed")
    done = _run(kind, strategy, tmp_path)  # a hang would hit the timeout
    assert done.returncode == 3, done.stderr[-3000:]
    error = (tmp_path / "error.txt").read_text()
    assert error.startswith("ConfigurationError") and message in error


@pytest.mark.multiprocess
def test_seqgan_trains_under_ddp(tmp_path):
    done = _run("seqgan", "ddp", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["phase"] == "done" and [h["phase"] for h in report["history"]][-1] == "adversarial"


VALIDATE_UNDER_CPU_DEEPSPEED = """
import lightning as L, torch
from lit_bigmodel.strategies import deepspeed_strategy
class M(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
    def validation_step(self, batch, index):
        self.log("val/out", self.layer(batch[0]).sum())
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), 0.1)
data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)
trainer = L.Trainer(accelerator="cpu", devices=1, strategy=deepspeed_strategy(2, accelerator="cpu"), logger=False,
                    enable_progress_bar=False)
print("validated:", sorted(trainer.validate(M(), data)[0]))
"""


@pytest.mark.multiprocess
def test_validate_alone_runs_under_the_cpu_deepspeed_strategy():
    """Lightning initialises DeepSpeed for inference on a second path, which also passed a CUDA index (None)."""
    pytest.importorskip("deepspeed")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", VALIDATE_UNDER_CPU_DEEPSPEED], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "validated: ['val/out']" in done.stdout
