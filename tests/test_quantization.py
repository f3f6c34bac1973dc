"""Quantization on torchao: post-training quantization and its saved directory, QAT (start step, resume,
conversion, distillation, pruning), float8 training's refusals, and every bad input."""

from __future__ import annotations

import glob
import json
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig, GPT2Config, LlamaConfig

from lit_bigmodel import ConfigurationError, DistillationModule, MissingPathError, OutputExistsError, SFTModule
from lit_bigmodel.datamodules import ArithmeticDataModule
from tests.conftest import tiny_trainer

pytest.importorskip("torchao")

from lit_bigmodel.quantization import (
    export_quantized,
    fake_quantize,
    quantize_network,
    quantized_layers,
    save_quantized,
    weight_bytes,
)
from lit_bigmodel.quantization.fp8 import Float8Training, convert_to_fp8, fp8_problems
from lit_bigmodel.quantization.layers import convert_fake_quantized, fake_quantized_layers
from lit_bigmodel.quantization.ptq import main as quantize_main
from lit_bigmodel.quantization.ptq import quantize_model, weight_file_bytes
from lit_bigmodel.quantization.qat import QuantizationAware
from lit_bigmodel.quantization.schemes import check_scheme


def _llama_config(**overrides):
    settings = dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=32, vocab_size=32, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaConfig(**{**settings, **overrides})


def _data(**overrides):
    settings = dict(max_operand=12, num_val=10, num_test=20, batch_size=16, eval_batch_size=20, seed=3)
    return ArithmeticDataModule(**{**settings, **overrides})


def _llama(seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(_llama_config()).eval()


def _ids(vocab=32):
    return torch.randint(0, vocab, (3, 12), generator=torch.Generator().manual_seed(1))


def _fit(root, callbacks, max_steps, ckpt_path=None, student=False, **trainer_kwargs):
    L.seed_everything(1)
    if student:
        module = DistillationModule(
            _llama_config(), _llama_config(num_hidden_layers=3), learning_rate=3e-3, warmup_steps=2
        )
    else:
        module = SFTModule(_llama_config(), learning_rate=3e-3, warmup_steps=2)
    trainer = tiny_trainer(
        root, max_steps=max_steps, callbacks=list(callbacks), limit_val_batches=0,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **trainer_kwargs,
    )  # fmt: skip
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    return module, trainer


# ---------------------------------------------------------------------------------------------- post-training
@pytest.mark.parametrize(
    "scheme, tensor_type, value_dtype",
    [
        ("int8_weight_only", "Int8Tensor", torch.int8),
        ("int8_dynamic", "Int8Tensor", torch.int8),
        ("intx4_weight_only", "IntxUnpackedToInt8Tensor", torch.int8),
        ("int8_dynamic_intx4", "IntxUnpackedToInt8Tensor", torch.int8),
    ],
)
def test_saved_directory_reloads_quantized_with_the_in_memory_outputs(tmp_path, scheme, tensor_type, value_dtype):
    model = _llama()
    float_bytes = weight_bytes(model)
    with torch.no_grad():
        float_logits = model(_ids()).logits
    layers = quantize_network(model, scheme)
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down of each block; the tied LM head stays float
    assert quantized_layers(model) == layers
    weight = model.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == tensor_type and weight.qdata.dtype == value_dtype
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        ours = model(_ids()).logits
    assert not torch.equal(ours, float_logits)  # the quantized layers really compute differently
    # in memory: each quantized weight is one byte a value plus its scales, instead of four
    linear_fp32 = sum(4 * m.weight.numel() for name, m in model.named_modules() if name in layers)
    assert weight_bytes(model) < float_bytes - 0.6 * linear_fp32

    save_quantized(model, tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    assert quantized_layers(reloaded) == layers
    assert type(reloaded.model.layers[1].self_attn.q_proj.weight).__name__ == tensor_type
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids()).logits, ours, rtol=0, atol=1e-6)


def test_a_classifier_keeps_its_head_float_and_reloads(tmp_path, tiny_bert_config):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        BertConfig(**{**tiny_bert_config.to_dict(), "num_labels": 3})
    )
    model.eval()
    layers = quantize_network(model, "int8_dynamic")
    assert "classifier" not in layers and "bert.encoder.layer.0.attention.self.query" in layers
    with torch.no_grad():
        ours = model(_ids(64)).logits
    save_quantized(model, tmp_path / "q")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "q").eval()
    assert quantized_layers(reloaded) == layers
    with torch.no_grad():
        torch.testing.assert_close(reloaded(_ids(64)).logits, ours, rtol=0, atol=1e-6)


def test_quantize_model_evaluates_before_and_after_and_writes_a_smaller_directory(tmp_path):
    data = _data()
    data.setup("test")
    model = AutoModelForCausalLM.from_config(_llama_config(vocab_size=len(data.tokenizer)))
    model.save_pretrained(tmp_path / "float")
    data.tokenizer.save_pretrained(tmp_path / "float")
    report = quantize_model(tmp_path / "float", tmp_path / "int8", "int8_weight_only", datamodule=_data(), device="cpu")
    assert "test/exact_match" in report.float_metrics and "test/loss" in report.quantized_metrics
    assert report.quantized_metrics["test/loss"] != report.float_metrics["test/loss"]
    assert report.quantized_file_bytes == weight_file_bytes(tmp_path / "int8")
    assert report.quantized_file_bytes < 0.5 * report.float_file_bytes
    assert report.slowdown is not None and any("forward on CPU" in line for line in report.lines())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int8")
    assert quantized_layers(reloaded) == report.layers
    assert os.path.isfile(tmp_path / "int8" / "tokenizer_config.json")


def test_cli_quantizes_with_a_data_config_and_prints_the_report(tmp_path, capsys):
    model = _llama()
    model.save_pretrained(tmp_path / "float")
    config = tmp_path / "data.yaml"
    config.write_text("data:\n  class_path: lit_bigmodel.datamodules.ArithmeticDataModule\n"
                      "  init_args: {max_operand: 12, num_val: 10, num_test: 20}\n")  # fmt: skip
    quantize_main([str(tmp_path / "float"), str(tmp_path / "q"), "--scheme", "intx4_weight_only", "--data", str(config),
                   "--task", "causal_lm", "--json", str(tmp_path / "report.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert "quantized 14 layers with intx4_weight_only" in out and "test/loss: float" in out
    assert json.loads((tmp_path / "report.json").read_text())["scheme"] == "intx4_weight_only"


# ---------------------------------------------------------------------------------------------- QAT
class _Probe(Callback):
    """Per training batch: the global step, whether a target layer fake-quantizes, and whether its output differs
    from a float linear with the same weights."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        layer = pl_module.model.model.layers[0].mlp.up_proj
        x = torch.randn(4, layer.in_features, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            differs = not torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
        self.seen.append((trainer.global_step, bool(fake_quantized_layers(pl_module.model)), differs))


def test_fake_quantization_turns_on_at_the_start_step_and_not_before(tmp_path):
    probe = _Probe()
    qat = QuantizationAware("int8_weight_only", start_step=3, convert_at_end=False)
    _fit(tmp_path, [qat, probe], max_steps=6)
    assert probe.seen == [(0, False, False), (1, False, False), (2, False, False),
                          (3, True, True), (4, True, True), (5, True, True)]  # fmt: skip


def test_qat_resume_is_exact_before_and_after_the_start_step(tmp_path):
    def run(root, ckpt_path=None, checkpoint=False):
        callbacks = [QuantizationAware("intx4_weight_only", start_step=3)]
        if checkpoint:
            callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=1, save_top_k=-1))
        module, _ = _fit(root, callbacks, max_steps=6, ckpt_path=ckpt_path)
        return module.model

    full = run(tmp_path / "a", checkpoint=True)
    reference = {k: v.dequantize() if hasattr(v, "dequantize") else v for k, v in full.state_dict().items()}
    assert len(quantized_layers(full)) == 14
    for step in (2, 4):  # float at the checkpoint, and fake-quantizing at the checkpoint
        (path,) = glob.glob(str(tmp_path / "a" / "ckpt" / f"*step={step}.ckpt"))
        resumed = run(tmp_path / f"b{step}", ckpt_path=path)
        assert quantized_layers(resumed) == quantized_layers(full)
        for key, value in resumed.state_dict().items():
            value = value.dequantize() if hasattr(value, "dequantize") else value
            assert torch.equal(value, reference[key]), (step, key)


def test_the_fake_quantized_forward_is_what_the_converted_network_computes():
    for scheme in ("int8_weight_only", "intx4_weight_only", "int8_dynamic_intx4"):
        model = _llama()
        fake_quantize(model, scheme)
        with torch.no_grad():
            trained_as = model(_ids()).logits
        convert_fake_quantized(model, scheme)
        assert not fake_quantized_layers(model) and len(quantized_layers(model)) == 14
        with torch.no_grad():
            torch.testing.assert_close(model(_ids()).logits, trained_as, rtol=0, atol=1e-4)


def test_distillation_student_trains_quantized_and_the_teacher_stays_full_precision(tmp_path):
    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.student = len(fake_quantized_layers(pl_module.model))
            self.teacher = len(fake_quantized_layers(pl_module.teacher))

    watch = Watch()
    module, _ = _fit(tmp_path, [QuantizationAware("int8_dynamic_intx8"), watch], max_steps=3, student=True)
    assert (watch.student, watch.teacher) == (14, 0)
    assert len(quantized_layers(module.model)) == 14 and quantized_layers(module.teacher) == []
    assert all(p.dtype == torch.float32 for p in module.teacher.parameters())
    module.export(tmp_path / "student")  # the module's own export hands a quantized network to export_quantized
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    batch = {"input_ids": _ids(len(module.tokenizer))}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, module.model.eval()(**batch).logits, rtol=0, atol=1e-6)


def test_pruned_zeros_survive_quantization_aware_training_and_conversion(tmp_path):
    from lit_bigmodel.callbacks import Pruning

    pruning = Pruning("unstructured", final_sparsity=0.5, schedule="one_shot", start_step=0)
    module, _ = _fit(tmp_path, [pruning, QuantizationAware("int8_weight_only", start_step=1)], max_steps=4)
    weight = module.model.model.layers[0].mlp.down_proj.weight
    assert type(weight).__name__ == "Int8Tensor"
    assert (weight.dequantize() == 0).float().mean().item() == pytest.approx(0.5, abs=0.01)


# ---------------------------------------------------------------------------------------------- fp8
def test_float8_training_is_refused_without_fp8_tensor_cores_and_on_sharded_strategies():
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    (problem,) = fp8_problems(DDPStrategy(), cpu, "bf16-mixed")
    assert "needs an NVIDIA GPU with fp8 tensor cores" in problem and "CPU" in problem
    assert "compute capability >= 8.9" in fp8_problems(DDPStrategy(), cuda, "bf16-mixed", capability=(8, 0))[0]
    assert fp8_problems(DDPStrategy(), cuda, "bf16-mixed", capability=(9, 0)) == []
    for strategy in (FSDPStrategy(), ModelParallelStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy)):
        (problem,) = fp8_problems(strategy, cuda, "bf16-true", capability=(9, 0))
        assert f"does not support {type(strategy).__name__}" in problem
    assert "precision to be one of" in fp8_problems(DDPStrategy(), cuda, "16-mixed", capability=(9, 0))[0]
    trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=cpu), precision="32-true")
    with pytest.raises(ConfigurationError, match=r"fp8 tensor cores.*precision to be one of"):
        Float8Training().setup(trainer, SimpleNamespace(), "fit")
    with pytest.raises(ConfigurationError, match="`recipe` must be one of"):
        Float8Training("fast")


def test_float8_conversion_keeps_the_parameters_and_state_dict_keys():
    model = _llama()
    before = {name: param for name, param in model.named_parameters()}
    layers = convert_to_fp8(model)
    assert len(layers) == 14 and type(model.model.layers[0].mlp.up_proj).__name__ == "Float8Linear"
    assert all(param is before[name] for name, param in model.named_parameters())
    assert list(model.state_dict()) == list(AutoModelForCausalLM.from_config(_llama_config()).state_dict())


def test_float8_training_refuses_a_network_with_nothing_to_convert():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.raises(ConfigurationError, match=r"its 4 projection layers are transformers' Conv1D \(GPT-2\)"):
        Float8Training().on_fit_start(SimpleNamespace(), SimpleNamespace(model=gpt2))
    with pytest.raises(ConfigurationError, match=r"no trainable nn\.Linear layer"):
        convert_to_fp8(_llama().requires_grad_(False))  # frozen: nothing to train in float8
    llama = _llama()
    Float8Training().on_fit_start(SimpleNamespace(), SimpleNamespace(model=llama))  # converts: no error
    assert type(llama.model.layers[0].mlp.up_proj).__name__ == "Float8Linear"


# ---------------------------------------------------------------------------------------------- bad input
def test_unknown_scheme_is_refused_everywhere(tmp_path, capsys):
    with pytest.raises(ConfigurationError, match=r"`scheme` must be one of \('int8_weight_only'.*got 'int3'"):
        QuantizationAware("int3")
    _llama().save_pretrained(tmp_path / "float")
    with pytest.raises(ConfigurationError, match="`scheme` must be one of"):
        quantize_model(tmp_path / "float", tmp_path / "q", "int3")
    with pytest.raises(SystemExit) as exit_info:
        quantize_main([str(tmp_path / "float"), str(tmp_path / "q"), "--scheme", "int3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "got 'int3'" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "q")


def test_a_scheme_the_device_cannot_run_is_refused_before_loading(tmp_path, monkeypatch):
    with pytest.raises(
        ConfigurationError, match=r"'int4_weight_only' needs CUDA, and the device is CPU; on CPU use one of \("
    ):
        quantize_model(tmp_path / "does-not-matter", tmp_path / "q", "int4_weight_only", device="cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "compute capability >= 8.0, this one has 7.5" in check_scheme("int4_weight_only", torch.device("cuda"))
    assert check_scheme("int8_weight_only", torch.device("cuda")) is None
    with pytest.raises(ConfigurationError, match=r"no quantization-aware training.*'intx4_weight_only'"):
        QuantizationAware("int4_weight_only")
    with pytest.raises(ConfigurationError, match=r"no quantization-aware training.*'int8_dynamic_intx8'"):
        QuantizationAware("int8_dynamic")
    with pytest.raises(ConfigurationError, match="`group_size` must be a power of two"):
        QuantizationAware("intx4_weight_only", group_size=48)
    with pytest.raises(ConfigurationError, match="`start_step` must be an int >= 0"):
        QuantizationAware(start_step=-1)
    with pytest.raises(ConfigurationError, match="`device` must be 'cpu' or 'cuda'"):
        quantize_model(tmp_path, tmp_path / "q", "int8_weight_only", device="tpu")


def test_qat_is_refused_on_sharded_strategies_with_peft_and_on_a_gpt2_conv1d_network(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    qat = QuantizationAware("int8_weight_only")
    for strategy in (FSDPStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy), ModelParallelStrategy()):
        with pytest.raises(ConfigurationError, match=f"QuantizationAware does not support {type(strategy).__name__}"):
            qat.setup(SimpleNamespace(strategy=strategy), SimpleNamespace(), "fit")
    ddp = SimpleNamespace(strategy=DDPStrategy(parallel_devices=[torch.device("cpu")]))
    qat.setup(ddp, SimpleNamespace(), "fit")
    with pytest.raises(ConfigurationError, match="`peft` must be None, got LoraConfig"):
        qat.setup(ddp, SimpleNamespace(peft=type("LoraConfig", (), {})()), "fit")
    gpt2 = SFTModule(GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=32), learning_rate=1e-3)
    trainer = tiny_trainer(tmp_path, max_steps=2, callbacks=[QuantizationAware("int8_weight_only")])
    with pytest.raises(ConfigurationError, match="GPT-2-style Conv1D"):
        trainer.fit(gpt2, _data())


def test_quantizing_a_directory_that_is_not_a_model_is_refused(tmp_path):
    out = tmp_path / "q"
    with pytest.raises(MissingPathError, match="does not exist"):
        quantize_model(tmp_path / "missing", out, "int8_weight_only")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match=r"is not a model directory: it has no config\.json"):
        quantize_model(tmp_path / "empty", out, "int8_weight_only")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigurationError, match="is a peft adapter folder, not a model"):
        quantize_model(tmp_path / "adapter", out, "int8_weight_only")
    (tmp_path / "last.ckpt").write_bytes(b"x")
    with pytest.raises(ConfigurationError, match="lit-bigmodel export CKPT DIR"):
        quantize_model(tmp_path / "last.ckpt", out, "int8_weight_only")
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigurationError, match="GPT-2-style Conv1D"):
        quantize_model(tmp_path / "gpt2", out, "int8_weight_only", time_inference=False)
    model = _llama()
    quantize_network(model, "int8_weight_only")
    save_quantized(model, tmp_path / "already")
    with pytest.raises(ConfigurationError, match="holds a quantized model already"):
        quantize_model(tmp_path / "already", out, "int8_weight_only")
    assert not out.exists()
    (out / "sub").mkdir(parents=True)
    _llama().save_pretrained(tmp_path / "float")
    with pytest.raises(OutputExistsError, match="is not empty"):
        quantize_model(tmp_path / "float", out, "int8_weight_only")


def test_saving_what_is_not_quantized_is_refused(tmp_path):
    with pytest.raises(ConfigurationError, match="the network is not quantized"):
        save_quantized(_llama(), tmp_path / "q")
    model = _llama()
    fake_quantize(model, "int8_weight_only")
    with pytest.raises(ConfigurationError, match="still fake-quantized"):
        save_quantized(model, tmp_path / "q")
    module = SimpleNamespace(peft=object(), adapters=None)
    with pytest.raises(ConfigurationError, match="the module has `peft` adapters"):
        export_quantized(module, tmp_path / "q")
    assert not (tmp_path / "q").exists()
