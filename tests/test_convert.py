"""CA-LoRA conversion: student/teacher wiring, the three switches, ffn slicing, artefacts, bnb layers."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from adapterhub_c.adapters.lora import LoraAdapter
from adapterhub_c.errors import UsageError
from adapterhub_c.evals.data import Dataset, load_dataset
from adapterhub_c.models.tiny import build_tiny_llama
from adapterhub_c.training import peft_io
from adapterhub_c.training.convert import (
    ConvertInputs,
    build_student,
    build_teacher,
    ca_lora,
    distill_convert,
    load_adapted,
)
from adapterhub_c.training.loop import TrainConfig
from adapterhub_c.training.recovery import (
    Recovery,
    RecoveryConfig,
    attach_recovery,
    detach_recovery,
    read_recovery_file,
    recovery_modules,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SOURCE_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_llama()[1]


@pytest.fixture(scope="module")
def texts():
    return Dataset("builtin:pydoc", "train", texts=load_dataset("builtin:pydoc", "train").texts[:12])


@pytest.fixture(scope="module")
def source() -> LoraAdapter:
    """A LoRA of the tiny base with random (non-zero) A and B."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_tiny_llama()
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(SOURCE_TARGETS)))
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return peft_io.extract_lora(pm)


def prune_rows(model: nn.Module, sparsity: float = 0.5) -> nn.Module:
    """Magnitude pruning by hand: zero the smallest half of every row of every block linear."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and ".layers." in name:
                w = mod.weight
                k = int(w.shape[1] * sparsity)
                thr = w.abs().kthvalue(k, dim=1, keepdim=True).values
                w.masked_fill_(w.abs() <= thr, 0.0)
    return model


def variant() -> nn.Module:
    return prune_rows(build_tiny_llama()[0])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[5, 70, 80, 90, 100, 33, 44, 120, 200, 17]])


def cfg(**kw) -> TrainConfig:
    base = dict(steps=6, lr=3e-3, batch_size=2, seq_len=32, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def expected_trainable(source: LoraAdapter, recover: bool) -> set[str]:
    names = set()
    for m in source.modules():
        names |= {f"base_model.model.{m}.lora_A.default.weight", f"base_model.model.{m}.lora_B.default.weight"}
    if recover:
        for layer in range(2):
            for lin in LINEARS:
                part = "self_attn" if lin in LINEARS[:4] else "mlp"
                host = f"base_model.model.model.layers.{layer}.{part}.{lin}"
                names |= {f"{host}.recovery.D", f"{host}.recovery.U"}
    return names


class CallRecorder:
    """Counts forward calls of a module and records (training, grad enabled) at each."""

    def __init__(self, module):
        self.calls = []
        module.register_forward_pre_hook(lambda m, a: self.calls.append((m.training, torch.is_grad_enabled())))


# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("recover", [True, False])
def test_trainable_parameters_are_exactly_the_students_lora_and_recovery(source, recover):
    student = build_student(variant(), source, recover=recover, recover_rank=4)
    got = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert got == expected_trainable(source, recover)
    assert {n for n, _ in student.trainable} == got
    assert (student.recovery_state() is not None) == recover
    assert bool(recovery_modules(student.model)) == recover


def test_step_zero_student_equals_variant_plus_inherited_lora_exactly(source):
    student = build_student(variant(), source, recover_rank=4)
    assert all(r.U.abs().sum() == 0 for r in recovery_modules(student.model).values())
    reference = load_adapted(variant(), source)
    student.model.eval()
    assert torch.equal(logits(student.model, IDS), logits(reference, IDS))
    # inherit copies the source's factors exactly
    inherited = student.lora_adapter().tensors
    assert inherited.keys() == source.tensors.keys()
    assert all(torch.equal(inherited[k], source.tensors[k]) for k in inherited)


def test_no_inherit_starts_from_peft_default_init(source):
    student = build_student(variant(), source, inherit=False, recover=False)
    t = student.lora_adapter().tensors
    assert all(v.abs().sum() == 0 for k, v in t.items() if "lora_B" in k)
    assert all(not torch.equal(v, source.tensors[k]) for k, v in t.items() if "lora_A" in k)
    student.model.eval()
    assert torch.equal(logits(student.model, IDS), logits(variant(), IDS))


def test_distillation_teacher_is_frozen_eval_no_grad_and_loss_goes_down(source, tok, texts):
    student = build_student(variant(), source, recover_rank=4)
    teacher = build_teacher(build_tiny_llama()[0], source)
    rec = CallRecorder(teacher)
    result = distill_convert(student, teacher, tok, texts, config=cfg(steps=30))
    assert len(rec.calls) == 30 and all(c == (False, False) for c in rec.calls)
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    losses = result.train.losses
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    assert {"task_loss", "distill_loss"} <= set(result.train.logs[-1])
    assert result.recovery_state and any(v.abs().sum() > 0 for k, v in result.recovery_state.items()
                                         if k.endswith("recovery_U"))
    # the teacher is the uncompressed base + source LoRA: unchanged by training
    assert torch.equal(logits(teacher, IDS), logits(load_adapted(build_tiny_llama()[0], source), IDS))


def test_no_distill_never_calls_the_teacher(source, tok, texts):
    student = build_student(variant(), source, recover=False)
    teacher = build_teacher(build_tiny_llama()[0], source)
    rec = CallRecorder(teacher)
    result = distill_convert(student, teacher, tok, texts, distill=False, config=cfg(steps=3))
    assert rec.calls == [] and "distill_loss" not in result.train.logs[-1]
    assert result.recovery_state is None


def test_logits_distillation_and_teacher_checks(source, tok, texts):
    student = build_student(variant(), source, recover=False)
    teacher = build_teacher(build_tiny_llama()[0], source)
    result = distill_convert(student, teacher, tok, texts, distill_on="logits", config=cfg(steps=2))
    assert result.train.logs[-1]["distill_loss"] > 0
    with pytest.raises(UsageError, match="itself"):
        distill_convert(student, student.model, tok, texts, config=cfg(steps=1))
    with pytest.raises(UsageError, match="teacher"):
        distill_convert(student, None, tok, texts, config=cfg(steps=1))
    with pytest.raises(UsageError, match="distill_on"):
        distill_convert(student, teacher, tok, texts, distill_on="attention", config=cfg(steps=1))


def test_zero_data_is_inheritance_only(source, tok):
    student = build_student(variant(), source, recover_rank=4)
    result = distill_convert(student, None, tok, None)
    assert result.train is None
    assert all(torch.equal(result.lora.tensors[k], source.tensors[k]) for k in source.tensors)
    assert all(v.abs().sum() == 0 for k, v in result.recovery_state.items() if k.endswith("recovery_U"))


def test_bad_inputs_are_refused(source, tok):
    renamed = LoraAdapter(config=dict(source.config),
                          tensors={k.replace("q_proj", "qkv_proj"): v for k, v in source.tensors.items()})
    with pytest.raises(UsageError, match="qkv_proj"):
        build_student(variant(), renamed)
    student = build_student(variant(), source, recover=False)
    with pytest.raises(UsageError, match="empty"):
        distill_convert(student, None, tok, Dataset("empty", "train"), distill=False, config=cfg())
    with pytest.raises(UsageError, match="activation"):
        RecoveryConfig(act="tanh")


def test_convert_in_one_call(source, tok, texts):
    from adapterhub_c.options.convert import ConvertOptions

    def inputs(base, dataset):
        return ConvertInputs(variant=variant(), tokenizer=tok, source=source, base=base, dataset=dataset)

    result = ca_lora(inputs(build_tiny_llama()[0], texts), ConvertOptions(recover_rank=4), cfg(steps=2)).result
    assert result.train is not None and len(result.train.losses) == 2 and "distill_loss" in result.train.logs[-1]
    assert result.recovery_config.rank == 4 and result.recovery_state
    with pytest.raises(UsageError, match="uncompressed base"):
        ca_lora(inputs(None, texts), ConvertOptions(), cfg(steps=2))
    no_data = ca_lora(inputs(None, None), ConvertOptions(recover="none")).result
    assert no_data.train is None and no_data.recovery_state is None


def test_convert_measures_every_row_while_its_model_exists(source, tok, texts):
    """``measure`` sees the variant, naive, teacher and converted models, in that order."""
    from adapterhub_c.options.convert import ConvertOptions
    from adapterhub_c.training.convert import ROW_CONVERTED, ROW_NAIVE, ROW_TEACHER, ROW_VARIANT

    seen, ids = [], torch.tensor([[5, 70, 80, 90, 100, 33]])

    def measure(row, model):
        seen.append(row)
        with torch.no_grad():
            return float(model(ids).logits.float().abs().mean())

    inputs = ConvertInputs(variant=variant(), tokenizer=tok, source=source, base=build_tiny_llama()[0], dataset=texts)
    done = ca_lora(inputs, ConvertOptions(recover_rank=4), cfg(steps=2), measure=measure)
    assert seen == [ROW_VARIANT, ROW_NAIVE, ROW_TEACHER, ROW_CONVERTED] == list(done.measurements)
    assert inputs.base is None  # dropped: the teacher holds what it needs
    quick = ca_lora(ConvertInputs(variant=variant(), tokenizer=tok, source=source, dataset=texts),
                    ConvertOptions(reference_rows=False, distill=False), cfg(steps=1), measure=measure)
    assert list(quick.measurements) == [ROW_CONVERTED] and quick.result.train is not None


def test_resume_with_changed_distill_alpha_is_refused(source, tok, texts, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    teacher = build_teacher(build_tiny_llama()[0], source)
    distill_convert(build_student(variant(), source, recover_rank=4), teacher, tok, texts,
                    config=cfg(steps=2, checkpoint_dir=ckpt))
    with pytest.raises(UsageError, match="distill_alpha"):
        distill_convert(build_student(variant(), source, recover_rank=4), teacher, tok, texts,
                        distill_alpha=0.5, config=cfg(steps=2, checkpoint_dir=ckpt), resume=True)


def _shrink(mlp: nn.Module, kept: torch.Tensor) -> None:
    def sliced(lin: nn.Linear, dim: int) -> nn.Linear:
        w = lin.weight.detach().index_select(dim, kept).clone()
        new = nn.Linear(w.shape[1], w.shape[0], bias=False)
        new.weight = nn.Parameter(w)
        return new
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = sliced(mlp.gate_proj, 0), sliced(mlp.up_proj, 0), sliced(mlp.down_proj, 1)


def test_ffn_channel_slicing_matches_the_unpruned_model_with_channels_zeroed(tok):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(build_tiny_llama()[0], LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                           target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    src = peft_io.extract_lora(pm)
    kept = {f"model.layers.{i}.mlp": torch.sort(torch.randperm(128, generator=gen)[:64]).values for i in range(2)}

    pruned = build_tiny_llama()[0]
    for name, idx in kept.items():
        _shrink(pruned.get_submodule(name), idx)
    pruned.config.intermediate_size = 64

    zeroed = build_tiny_llama()[0]
    tensors = dict(src.tensors)
    with torch.no_grad():
        for name, idx in kept.items():
            drop = torch.ones(128, dtype=torch.bool)
            drop[idx] = False
            mlp = zeroed.get_submodule(name)
            mlp.gate_proj.weight[drop] = 0
            mlp.up_proj.weight[drop] = 0
            mlp.down_proj.weight[:, drop] = 0
            for leaf in ("gate_proj", "up_proj"):
                key = f"base_model.model.{name}.{leaf}.lora_B.weight"
                tensors[key] = tensors[key].clone()
                tensors[key][drop] = 0
            key = f"base_model.model.{name}.down_proj.lora_A.weight"
            tensors[key] = tensors[key].clone()
            tensors[key][:, drop] = 0
    reference = load_adapted(zeroed, LoraAdapter(config=src.config, tensors=tensors))

    with pytest.raises(UsageError, match="kept indices"):
        build_student(copy.deepcopy(pruned), src, recover=False)
    student = build_student(pruned, src, recover=False, kept_indices=kept)
    student.model.eval()
    assert torch.allclose(logits(student.model, IDS), logits(reference, IDS), atol=1e-5, rtol=0)
    a = student.lora_adapter().tensors
    assert a["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"].shape == (64, 4)
    assert a["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 64)


def test_converted_artefact_loads_in_plain_peft_and_recovery_round_trips(source, tok, texts, tmp_path):
    from peft import PeftModel

    student = build_student(variant(), source, recover_rank=4)
    teacher = build_teacher(build_tiny_llama()[0], source)
    result = distill_convert(student, teacher, tok, texts, config=cfg(steps=4))
    folder = result.save(tmp_path / "converted")
    assert (folder / "adapter_config.json").is_file() and (folder / "recovery.safetensors").is_file()

    plain = PeftModel.from_pretrained(variant(), str(folder)).eval()
    ours = load_adapted(variant(), LoraAdapter.from_folder(folder))
    assert torch.equal(logits(plain, IDS), logits(ours, IDS))

    state, config = read_recovery_file(folder / "recovery.safetensors")
    assert config.rank == 4 and config.act == "gelu" and config.scale == 2.0
    assert all(torch.equal(state[k], result.recovery_state[k]) for k in state) and state.keys() == result.recovery_state.keys()
    with_rec = load_adapted(variant(), LoraAdapter.from_folder(folder), folder)
    student.model.eval()
    assert torch.equal(logits(with_rec, IDS), logits(student.model, IDS))
    assert not torch.equal(logits(with_rec, IDS), logits(ours, IDS))  # recovery matters
    assert detach_recovery(with_rec) == 14
    assert torch.equal(logits(with_rec, IDS), logits(ours, IDS))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    build_tiny_llama()[0].save_pretrained(folder)
    return folder


def load_bnb(folder, quant: str):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    qc = (BitsAndBytesConfig(load_in_8bit=True) if quant == "int8" else
          BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                 quantization_config=qc)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False  # see variants/quantize.py
    return model.eval()


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_recovery_beside_bnb_layers_adds_R_of_x(tiny_folder, quant):
    import warnings

    warnings.filterwarnings("ignore", message="MatMul8bitLt")
    model = load_bnb(tiny_folder, quant)
    layer = model.model.layers[0].mlp.up_proj
    assert type(layer).__name__ in ("Linear8bitLt", "Linear4bit")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        before = layer(x)
        attach_recovery(model, RecoveryConfig(rank=4, act="silu"))
        assert torch.equal(layer(x), before)  # U = 0
        rec: Recovery = layer.recovery
        rec.U.normal_()
        expected = before + torch.nn.functional.silu(x @ rec.D.t()) @ rec.U.t() * rec.config.scale
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_4bit_student_trains_lora_and_recovery(source, tok, texts, tiny_folder):
    import bitsandbytes as bnb

    student = build_student(load_bnb(tiny_folder, "nf4"), source, recover_rank=4)
    got = {n for n, p in student.model.named_parameters() if p.requires_grad}
    assert got == expected_trainable(source, recover=True)
    hosts = peft_io.lora_layers(student.model)
    assert isinstance(hosts["model.layers.0.self_attn.q_proj"].get_base_layer(), bnb.nn.Linear4bit)
    student.model.eval()
    assert torch.equal(logits(student.model, IDS), logits(load_adapted(load_bnb(tiny_folder, "nf4"), source), IDS))
    teacher = build_teacher(build_tiny_llama()[0], source)
    result = distill_convert(student, teacher, tok, texts, config=cfg(steps=4))
    assert all(torch.isfinite(torch.tensor(result.train.losses)))
    assert any(v.abs().sum() > 0 for k, v in result.recovery_state.items() if k.endswith("recovery_U"))
    changed = [k for k in source.tensors if not torch.equal(result.lora.tensors[k], source.tensors[k])]
    assert changed
