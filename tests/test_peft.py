"""PEFT adapters through `peft` (LoRA, DoRA, rsLoRA): what trains, merge, both exports, adapter-only resume, errors."""

from __future__ import annotations

import io
import os
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from lit_bigmodel import ConfigurationError, DistillationModule, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule
from tests.conftest import tiny_trainer

peft = pytest.importorskip("peft")
LoraConfig = peft.LoraConfig

CONFIGS = {
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=32),  # Conv1D layers
    "llama": lambda: LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    ),
}
KINDS = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
}


def _lora(**kwargs):
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", **kwargs)


def _fit(module, tmp_path, max_steps=4, ckpt_path=None, **trainer_kwargs):
    trainer = tiny_trainer(tmp_path, max_steps=max_steps, limit_val_batches=0, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ArithmeticDataModule(batch_size=16, num_val=20, num_test=20), ckpt_path=ckpt_path)
    return trainer


def _tokens(module, rows=2, length=10):
    return torch.randint(0, module.model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(3))


def _perturb_adapters(module):
    """LoRA's B starts at zero (adapters change nothing yet): give every adapter weight a value."""
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_only_adapters_require_grad_and_sit_in_the_optimizer(arch, tmp_path):
    L.seed_everything(0)
    module = SFTModule(CONFIGS[arch](), learning_rate=1e-2, peft=_lora())
    trainer = _fit(module, tmp_path)
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}
    linear_layers = [n for n, m in module.model.named_modules() if hasattr(m, "lora_A")]
    assert len(linear_layers) == {"gpt2": 4, "llama": 7}[arch] * 2  # every linear layer but the LM head


def test_classifier_head_trains_beside_the_adapters(tiny_bert_config):
    module = SFTModule(tiny_bert_config, task="sequence_classification", num_labels=3, peft=_lora())
    module.configure_model()
    trainable = {name for name, param in module.named_parameters() if param.requires_grad}
    assert any("classifier" in name for name in trainable)
    assert all("lora_" in name or "classifier" in name for name in trainable)


def _adapted_logits(module):
    """Give the adapters values, then the adapted network's eval-mode logits on fixed tokens: (tokens, logits)."""
    module.configure_model()
    _perturb_adapters(module)
    module.model.eval()
    x = _tokens(module)
    with torch.no_grad():
        return x, module.model(input_ids=x).logits


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_merged_export_gives_the_adapted_models_logits(arch, kind, tmp_path):
    torch.manual_seed(0)
    module = SFTModule(CONFIGS[arch](), peft=_lora(**KINDS[kind]))
    x, adapted = _adapted_logits(module)
    with torch.no_grad():
        base = module.adapters.get_base_model()
        with module.adapters.disable_adapter():
            without = module.model(input_ids=x).logits
    assert (adapted - without).abs().max() > 1e-3  # the adapters change the function
    module.export(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=1e-5)
    assert base is module.model  # the module trains the network with the adapters injected


def test_adapter_export_loads_onto_the_base_model(tmp_path):
    torch.manual_seed(0)
    base_dir = tmp_path / "base"
    AutoModelForCausalLM.from_config(CONFIGS["llama"]()).save_pretrained(base_dir)
    module = SFTModule(str(base_dir), tokenizer=None, peft=_lora(use_dora=True))
    x, adapted = _adapted_logits(module)
    module.export(tmp_path / "adapter", merge=False)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=x).logits, adapted, rtol=0, atol=1e-5)


def test_merge_false_without_adapters_is_refused(tmp_path):
    module = SFTModule(CONFIGS["gpt2"]())
    module.configure_model()
    with pytest.raises(ConfigurationError, match="`merge=False` exports adapters"):
        module.export(tmp_path / "out", merge=False)


def _adapter_weights(module):
    return {name: param.detach().clone() for name, param in module.model.named_parameters() if param.requires_grad}


def test_resume_from_an_adapter_only_checkpoint_is_exact(tmp_path):
    def make():
        L.seed_everything(0)  # the base from a config: the same seed builds the same base
        return SFTModule(CONFIGS["gpt2"](), learning_rate=1e-2, warmup_steps=2, peft=_lora())

    straight = make()
    _fit(straight, tmp_path / "straight", max_steps=6)

    first = make()  # the same 6-step run (so the same LR schedule), checkpointed at step 3
    every_3 = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=3, save_top_k=-1)
    _fit(first, tmp_path / "first", max_steps=6, enable_checkpointing=True, callbacks=[every_3])
    path = str(tmp_path / "checkpoints" / "epoch=0-step=3.ckpt")
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint["state_dict"]) == {f"model.{name}" for name in _adapter_weights(first)}
    assert checkpoint["lit_bigmodel_adapters"]["base_fingerprint"]

    resumed = make()
    trainer = tiny_trainer(tmp_path / "resumed", max_steps=6, limit_val_batches=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(resumed, ArithmeticDataModule(batch_size=16, num_val=20, num_test=20), ckpt_path=path)
    ours, theirs = _adapter_weights(resumed), _adapter_weights(straight)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_resume_onto_another_base_is_refused(tmp_path):
    L.seed_everything(0)
    first = SFTModule(CONFIGS["gpt2"](), peft=_lora())
    trainer = _fit(first, tmp_path / "first", max_steps=2, enable_checkpointing=True)
    path = trainer.checkpoint_callback.best_model_path
    L.seed_everything(1)  # another random base
    other = SFTModule(CONFIGS["gpt2"](), peft=_lora())
    with pytest.raises(ConfigurationError, match="not the one they were trained on"):
        _fit(other, tmp_path / "other", max_steps=4, ckpt_path=path)


def test_full_checkpoints_keep_the_base(tmp_path):
    L.seed_everything(0)
    module = SFTModule(CONFIGS["gpt2"](), peft=_lora(), full_checkpoints=True)
    trainer = _fit(module, tmp_path, max_steps=2, enable_checkpointing=True)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    assert set(checkpoint["state_dict"]) == set(module.state_dict())


def test_adapter_checkpoint_of_gpt2_124m_is_under_3_percent_of_the_full_one(capsys):
    module = SFTModule(GPT2Config(), peft=LoraConfig(r=8, target_modules="all-linear"))
    module.configure_model()

    def size(checkpoint):
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        return buffer.tell()

    full = size({"state_dict": module.state_dict()})
    adapter_only = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(adapter_only)
    ratio = size(adapter_only) / full
    with capsys.disabled():
        print(
            f"\nGPT-2 124M, LoRA r=8 all-linear: adapter checkpoint {size(adapter_only):,} B, full {full:,} B ({ratio:.2%})"
        )
    assert ratio <= 0.03


def test_distillation_student_gets_the_adapters_and_the_teacher_stays_whole(tmp_path):
    L.seed_everything(0)
    module = DistillationModule(
        CONFIGS["gpt2"](), CONFIGS["gpt2"](), hidden_layer_map={2: 2}, learning_rate=1e-2, peft=_lora()
    )
    trainer = _fit(module, tmp_path, max_steps=3)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or name.startswith("projections.") for name in trainable)
    assert not any("lora_" in name for name, _ in module.teacher.named_parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.parameters() if p.requires_grad}


def test_bad_peft_arguments_are_clear_errors():
    with pytest.raises(ConfigurationError, match=r"`peft` must be a peft\.PeftConfig"):
        SFTModule(CONFIGS["gpt2"](), peft={"r": 8})
    with pytest.raises(ConfigurationError, match=r"task_type='SEQ_CLS'.*'causal_lm' needs 'CAUSAL_LM'"):
        SFTModule(CONFIGS["gpt2"](), peft=_lora(task_type="SEQ_CLS"))
    module = SFTModule(CONFIGS["gpt2"](), peft=LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigurationError, match=r"target_modules=\{'q_proj'\}|target_modules=\['q_proj'\]"):
        module.configure_model()  # GPT-2 names its attention c_attn: nothing matches


def test_peft_from_the_cli_yaml(tmp_path):
    from lit_bigmodel.cli import run_cli

    config = tmp_path / "peft.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lit_bigmodel.SFTModule\n"
        "  init_args:\n"
        "    model: {class_path: transformers.GPT2Config, init_args: {n_layer: 1, n_embd: 32, n_head: 2, n_positions: 32}}\n"
        "    learning_rate: 0.01\n"
        "    peft:\n"
        "      class_path: peft.LoraConfig\n"
        "      init_args: {r: 4, target_modules: all-linear, use_dora: true}\n"
        "data:\n"
        "  class_path: lit_bigmodel.datamodules.ArithmeticDataModule\n"
        "  init_args: {batch_size: 16, num_val: 20, num_test: 20}\n"
    )
    cli = run_cli(
        ["fit", "-c", str(config), "--trainer.max_steps", "2", "--trainer.logger", "false",
         "--trainer.limit_val_batches", "0", "--trainer.enable_checkpointing", "false",
         "--trainer.default_root_dir", str(tmp_path), "--export_dir", str(tmp_path / "model")]
    )  # fmt: skip
    module = cli.model
    assert isinstance(module.peft, LoraConfig) and module.peft.use_dora
    assert any("lora_magnitude_vector" in name for name, _ in module.model.named_parameters())
    assert "model.safetensors" in os.listdir(tmp_path / "model")  # the merged export


def test_cli_export_of_peft_checkpoints(tmp_path, capsys):
    from lit_bigmodel.export import main as export_main

    data = ArithmeticDataModule(batch_size=16, num_val=20, num_test=20)
    torch.manual_seed(0)
    base = SFTModule(CONFIGS["gpt2"](), tokenizer=data.tokenizer)
    base.configure_model()
    base.export(tmp_path / "base")  # a base model directory, as users fine-tune
    L.seed_everything(0)
    module = SFTModule(str(tmp_path / "base"), learning_rate=5e-2, peft=_lora(use_dora=True))
    trainer = _fit(module, tmp_path / "run", max_steps=3, enable_checkpointing=True)
    checkpoint = trainer.checkpoint_callback.best_model_path
    module.model.eval()
    x = _tokens(module)
    with torch.no_grad():
        adapted = module.model(input_ids=x).logits

    with pytest.raises(SystemExit) as exit_info:  # adapter-only: the base is needed
        export_main([checkpoint, str(tmp_path / "no_base")])
    assert exit_info.value.code == 2 and "--base DIR" in capsys.readouterr().err
    assert not (tmp_path / "no_base").exists()

    export_main([checkpoint, str(tmp_path / "merged"), "--base", str(tmp_path / "base")])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    export_main([checkpoint, str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--adapters-only"])
    reloaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded.eval()(input_ids=x).logits, adapted, rtol=0, atol=1e-5)

    torch.manual_seed(1)
    other = SFTModule(CONFIGS["gpt2"](), tokenizer=data.tokenizer)
    other.configure_model()
    other.export(tmp_path / "other_base")
    with pytest.raises(SystemExit):  # another base: the fingerprint differs
        export_main([checkpoint, str(tmp_path / "wrong"), "--base", str(tmp_path / "other_base")])
    assert "not the one they were trained on" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- sharded strategies
# (the 2-process runs under every strategy are in tests/test_strategies.py, marker `multiprocess`)
def test_adapter_keys_leave_out_the_names_fsdp_wrappers_insert():
    from lit_bigmodel.adapters import adapter_keys

    class Wrapper(torch.nn.Module):  # as FSDP1 (and activation checkpointing) nest a wrapped block
        def __init__(self):
            super().__init__()
            self._fsdp_wrapped_module = torch.nn.Linear(2, 2)

    root = torch.nn.Module()
    root.block = Wrapper()
    root.block._fsdp_wrapped_module.bias.requires_grad_(False)
    assert adapter_keys(root, "model.") == {"model.block.weight"}  # the state dict's name


def test_base_fingerprint_is_empty_for_weights_that_are_not_all_here():
    from lit_bigmodel.adapters import base_fingerprint

    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).requires_grad_(False)
    assert len(base_fingerprint(network)) == 2
    network[1].weight.ds_id = 0  # a ZeRO-3 partition (its data is this rank's share only)
    assert base_fingerprint(network) == []
    meta = torch.nn.Linear(2, 2, device="meta").requires_grad_(False)
    assert base_fingerprint(meta) == []


def test_a_bf16_base_gets_bf16_adapters_under_fsdp_and_fp32_ones_elsewhere():
    """FSDP1 flattens a block's frozen and trainable weights into one tensor of one dtype."""
    from lit_bigmodel.adapters import uniform_trainable_dtype
    from lit_bigmodel.strategies import fsdp_strategy

    def base():
        return AutoModelForCausalLM.from_config(CONFIGS["gpt2"]()).to(torch.bfloat16)

    def trainable_dtypes(module):
        return {p.dtype for p in module.model.parameters() if p.requires_grad}

    plain = SFTModule(base, peft=_lora())
    plain.configure_model()
    assert trainable_dtypes(plain) == {torch.float32}  # peft's default: adapters in float32
    sharded = SFTModule(base, peft=_lora())
    sharded.trainer = L.Trainer(accelerator="cpu", devices=1, strategy=fsdp_strategy(accelerator="cpu"), logger=False)
    sharded.configure_model()
    assert {p.dtype for p in sharded.model.parameters()} == {torch.bfloat16}
    # FSDP2 wants one dtype among the trainable weights only: float32 LoRA beside a bfloat16 head to save is not
    network = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    network[0].to(torch.bfloat16).requires_grad_(False)
    network[1].to(torch.bfloat16)
    uniform_trainable_dtype(network)
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    network[1].float()
    network[2].float()
    uniform_trainable_dtype(network)  # uniform already: left in float32
    assert {p.dtype for p in network[1:].parameters()} == {torch.float32}


def test_adapted_copy_from_a_gathered_state_merges_and_saves_like_the_live_network(tmp_path):
    """What `export` does under DeepSpeed / FSDP / FSDP2: a CPU copy rebuilt from the config and the full state."""
    from lit_bigmodel.adapters import adapted_copy, export_adapters

    torch.manual_seed(0)
    module = SFTModule(CONFIGS["llama"](), peft=_lora(use_dora=True))
    module.configure_model()
    _perturb_adapters(module)
    module.model.eval()
    x = _tokens(module)
    with torch.no_grad():
        adapted = module.model(input_ids=x).logits
    state = {key: value.detach().clone() for key, value in module.model.state_dict().items()}
    random_state = torch.random.get_rng_state()
    copy = adapted_copy(module.model, module.adapters, "causal_lm", state)
    assert torch.equal(torch.random.get_rng_state(), random_state)  # ranks keep drawing alike after an export
    export_adapters(str(tmp_path / "merged"), copy)
    export_adapters(str(tmp_path / "adapter"), copy, merge=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}, strict=False)
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=1e-5)
        torch.testing.assert_close(reloaded(input_ids=x).logits, adapted, rtol=0, atol=1e-5)


def test_distillation_checkpoints_with_peft_load_with_weights_only(tmp_path):
    """DistillationModule records its **kwargs (peft among them) as hyperparameters; a PeftConfig object there
    would make Lightning's resume (torch.load with weights_only=True) fail."""
    L.seed_everything(0)
    module = DistillationModule(CONFIGS["gpt2"](), CONFIGS["gpt2"](), learning_rate=1e-2, peft=_lora())
    trainer = _fit(module, tmp_path, max_steps=1, enable_checkpointing=True)
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert "peft" not in checkpoint.get("hyper_parameters", {})
    assert "lit_bigmodel_adapters" in checkpoint
