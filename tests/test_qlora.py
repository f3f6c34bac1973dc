"""QLoRA (`SFTModule(quantization=BitsAndBytesConfig(...))`): the 4-bit base, its adapters, exports, and the errors.

Training needs CUDA (refused elsewhere, tested here); bitsandbytes' CPU reference kernels let the rest run on a
CPU: loading quantized, which parameters train, a step that moves only the adapters, both exports.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

from lit_bigmodel import ConfigurationError, DistillationModule, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule

peft = pytest.importorskip("peft")


def _nf4(dtype=torch.float32):
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def _lora():
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A saved Llama (grouped-query attention) base; widths that bitsandbytes' 4-bit blocks divide."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("base")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


def _quantized_module(base_dir, dtype=torch.float32):
    pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = SFTModule(base_dir, peft=_lora(), quantization=_nf4(dtype))
        module.configure_model()
    return module


def _tokens(rows=2, length=12):
    return torch.randint(0, 64, (rows, length), generator=torch.Generator().manual_seed(5))


def _perturb_adapters(module):
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if "lora_" in name:
                param.add_(0.05 * torch.randn_like(param))


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": {"load_in_4bit": True}}, "must be a transformers.BitsAndBytesConfig"),
        ({"quantization": BitsAndBytesConfig()}, "load_in_4bit=True"),
        ({"quantization": _nf4(), "peft": None}, "needs `peft` adapters"),
    ],
)
def test_bad_quantization_is_refused_when_the_module_is_built(base_dir, kwargs, message):
    arguments = {"peft": _lora(), **kwargs}
    with pytest.raises(ConfigurationError, match=message):
        SFTModule(base_dir, **arguments)


def test_a_quantized_base_must_load_from_a_directory():
    with pytest.raises(ConfigurationError, match="must be a save_pretrained directory or a hub id, got LlamaConfig"):
        SFTModule(LlamaConfig(), peft=_lora(), quantization=_nf4())


def test_without_bitsandbytes_the_error_names_the_package(base_dir, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name)
    )
    with pytest.raises(ConfigurationError, match="pip install bitsandbytes"):
        SFTModule(base_dir, peft=_lora(), quantization=_nf4())


def test_qlora_without_cuda_is_refused_before_training(base_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    module = SFTModule(base_dir, peft=_lora(), quantization=_nf4())
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(ConfigurationError, match="trains on a CUDA GPU, and this Trainer runs on 'cpu'"):
        trainer.fit(module, ArithmeticDataModule(batch_size=4, num_val=4, num_test=4))
    assert module.model is None and trainer.global_step == 0  # refused in setup: nothing loaded, nothing trained


def test_distillation_student_in_4_bit_is_refused_without_cuda_too(base_dir):
    pytest.importorskip("bitsandbytes")
    module = DistillationModule(base_dir, base_dir, peft=_lora(), quantization=_nf4())
    module.trainer = L.Trainer(accelerator="cpu", logger=False)
    with pytest.raises(ConfigurationError, match="CUDA GPU"):
        module.setup("fit")


def test_sharded_strategies_are_refused_for_a_quantized_base():
    from lit_bigmodel.qlora import check_quantized_device

    cuda = torch.device("cuda", 0)
    assert check_quantized_device(cuda, "SingleDeviceStrategy") is None
    assert check_quantized_device(cuda, "DDPStrategy") is None
    assert "one device or under DDP" in (check_quantized_device(cuda, "FSDPStrategy") or "")
    assert "one device or under DDP" in (check_quantized_device(cuda, "DeepSpeedStrategy") or "")


# ---------------------------------------------------------------------------------------------- the quantized network
def test_the_base_loads_in_4_bit_and_only_the_adapters_train(base_dir):
    import bitsandbytes as bnb

    module = _quantized_module(base_dir, dtype=torch.bfloat16)
    layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 blocks
    assert all(layer.weight.dtype == torch.uint8 and layer.weight.quant_type == "nf4" for layer in layers)
    trainable = {name: p for name, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert {p.dtype for p in trainable.values()} == {torch.bfloat16}  # the adapters compute in the compute dtype
    # a step moves the adapters and nothing else
    frozen = {name: p.detach().clone() for name, p in module.model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD(list(trainable.values()), lr=1.0)
    x = _tokens()
    module.model(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    assert any(p.abs().sum() > 0 for name, p in trainable.items() if "lora_B" in name)
    assert all(torch.equal(p, frozen[name]) for name, p in module.model.named_parameters() if not p.requires_grad)


def test_merging_into_the_quantized_base_needs_dequantize(base_dir, tmp_path):
    module = _quantized_module(base_dir)
    with pytest.raises(ConfigurationError, match="dequantize=True"):
        module.export(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_dequantized_merge_and_adapter_folder_give_the_quantized_models_logits(base_dir, tmp_path):
    module = _quantized_module(base_dir)
    _perturb_adapters(module)
    # Reference logits in train mode (no dropout in this config): in eval mode bitsandbytes' CPU kernels repack the
    # weights and compute in bfloat16; in train mode they dequantize and compute in the compute dtype, float32 here.
    x = _tokens()
    with torch.no_grad():
        adapted = module.model.train()(input_ids=x).logits.float()
    merged_dir = module.export(tmp_path / "merged", dequantize=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert getattr(merged.config, "quantization_config", None) is None  # a plain float model
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=0, atol=1e-4)
    # the adapter folder onto the quantized base, as QLoRA users load it
    module.export(tmp_path / "adapter", merge=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=_nf4(), device_map={"": "cpu"})
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").train()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits.float(), adapted, rtol=0, atol=1e-5)


def test_dequantized_weights_are_read_right_after_cpu_inference_repacked_them(base_dir):
    """bitsandbytes' CPU inference (eval mode, no grad) repacks 4-bit weights into its kernels' layout."""
    from lit_bigmodel.qlora import dequantized_state

    module = _quantized_module(base_dir)
    key = "model.layers.0.self_attn.q_proj.base_layer.weight"
    before = dequantized_state(module.model)[key]
    with torch.no_grad():
        module.model.eval()(input_ids=_tokens())
    after = dequantized_state(module.model)[key]
    print(f"max |after - before| = {(after - before).abs().max().item():.3g}")
    torch.testing.assert_close(after, before, rtol=0, atol=1e-3)


def _qlora_yaml(base_dir, tmp_path):
    config = tmp_path / "qlora.yaml"
    config.write_text(
        "model:\n"
        "  class_path: lit_bigmodel.SFTModule\n"
        "  init_args:\n"
        f"    model: {base_dir}\n"
        "    peft: {class_path: peft.LoraConfig, init_args: {r: 4, target_modules: all-linear}}\n"
        "    quantization:\n"
        "      class_path: transformers.BitsAndBytesConfig\n"
        "      init_args: {load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_compute_dtype: bfloat16}\n"
        "data:\n"
        "  class_path: lit_bigmodel.datamodules.ArithmeticDataModule\n"
        "  init_args: {batch_size: 4, num_val: 4, num_test: 4}\n"
    )
    return config


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "trains on a CUDA GPU"),
        (["--export_dir", "EXPORT"], "add --export_dequantize true"),  # checked before the model loads
        (["--export_dir", "EXPORT", "--export_dequantize", "true"], "trains on a CUDA GPU"),
    ],
)
def test_qlora_from_the_cli_yaml_is_refused_in_one_line_before_training(base_dir, tmp_path, capsys, extra, message):
    pytest.importorskip("bitsandbytes")
    from lit_bigmodel.cli import run_cli

    config = _qlora_yaml(base_dir, tmp_path)
    root = tmp_path / "runs"
    extra = [str(tmp_path / "export") if arg == "EXPORT" else arg for arg in extra]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "-c", str(config), "--trainer.max_steps", "2", "--trainer.default_root_dir", str(root), *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and message in err[-1]
    assert not root.exists() or not any(root.rglob("*.ckpt"))
    assert not (tmp_path / "export").exists()


@pytest.mark.gpu
def test_qlora_trains_on_cuda_and_both_exports_reload(base_dir, tmp_path):
    """The CUDA path end to end: 4-bit base on the GPU, bf16 adapters learn, both exports give the model's logits."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    L.seed_everything(0)
    module = SFTModule(base_dir, learning_rate=1e-2, warmup_steps=0, peft=_lora(), quantization=_nf4(torch.bfloat16))
    trainer = L.Trainer(
        accelerator="gpu", devices=1, max_steps=30, precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0,
    )  # fmt: skip
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer.callbacks.append(Record())
    data = ArithmeticDataModule(batch_size=32, num_val=8, num_test=8)
    trainer.fit(module, data)
    layers = [m for m in module.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(layer.weight.device.type == "cuda" for layer in layers)
    assert sum(losses[-5:]) < sum(losses[:5])  # the adapters learn
    x = _tokens().cuda()
    with torch.no_grad():
        adapted = module.model.train()(input_ids=x).logits.float().cpu()
    merged = AutoModelForCausalLM.from_pretrained(module.export(tmp_path / "merged", dequantize=True)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x.cpu()).logits, adapted, rtol=0, atol=5e-2)  # bf16 compute
