"""PEFT interoperability: PEFT loads our LoRA deltas and computes what we compute; we load PEFT's.

Tolerance: both sides compute ``W x + b + s B (A x)`` (DoRA: re-normalised and scaled) from the same float32
tensors, PEFT in another order of the same operations (DoRA: ``(m/||W'|| - 1) (W x) + ...`` with
``W x`` computed apart). Each reordering changes a result by a few float32 ulps (2^-24 ~ 6e-8 relative);
through the tiny models' ~30 dependent operations on values of order 1 that stays far below 1e-5, the
bound used (as for merge vs unmerged in test_lora.py).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config, GPT2LMHeadModel

import slimtune
from slimtune.compress import quantize_
from slimtune.delta import LoraLinear, TrainedCopy, add_lora_, deltas, load_peft_, save_peft
from slimtune.delta.inject import wrap_
from slimtune.errors import SlimTuneError

peft = pytest.importorskip("peft", reason="peft is in the dev extra: pip install -e '.[dev]'")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)  # float32 rounding of one computation in two orders (module docstring)


@pytest.fixture
def bert_dir(tiny_bert, tmp_path):
    """The tiny BERT with a (random, fixed) classification head, saved: every fresh copy is the same backbone."""
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.fixture
def gpt2_dir(tmp_path):
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


def _bert(path):
    return AutoModelForSequenceClassification.from_pretrained(path).eval()


def _causal(path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


def _ids(model, shape=(3, 9), seed=1):
    return torch.randint(0, model.config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _out(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def _perturb(model, std=0.3):
    """Nonzero B (a fresh LoRA is the identity), a moved DoRA magnitude and head: every saved tensor matters."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, w in deltas(model):
            params = [w.lora_B.weight] + ([w.lora_magnitude_vector] if getattr(w, "dora", False) else []) \
                if isinstance(w, LoraLinear) else list(w.copy.parameters())
            for p in params:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _peft_loads_ours(ours, fresh, directory, x):
    theirs = PeftModel.from_pretrained(fresh, directory).eval()
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert adapted == {n for n, w in deltas(ours) if isinstance(w, LoraLinear)}  # PEFT adapts exactly our modules
    torch.testing.assert_close(_out(theirs, x), _out(ours, x), **TOL)
    return theirs


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_peft_loads_our_bert_lora(bert_dir, tmp_path, head):
    ours = _bert(bert_dir)
    add_lora_(ours, ["query", "value"], rank=4, alpha=8)
    if head == "trained":
        wrap_(ours, "classifier", lambda m: TrainedCopy(m))
    _perturb(ours)
    save_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "SEQ_CLS", 4, 8)
    assert config["target_modules"] == ["query", "value"]
    # PEFT saves a SEQ_CLS head whole in any case (its own copy of the frozen one): modules_to_save names only ours.
    assert config["modules_to_save"] == (["classifier"] if head == "trained" else None)
    x = _ids(ours)
    _peft_loads_ours(ours, _bert(bert_dir), tmp_path / "peft", x)
    # Key names are PEFT's own: PEFT saving the same configuration produces exactly these keys.
    theirs = get_peft_model(_bert(bert_dir), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                        modules_to_save=["classifier"], task_type="SEQ_CLS"))
    ours_keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert set(ours_keys) == set(get_peft_model_state_dict(theirs))


@pytest.mark.parametrize("variant", [{}, {"dora": True}, {"rslora": True}], ids=["lora", "dora", "rslora"])
def test_peft_loads_our_llama_lora_on_every_linear(tiny_llama, tmp_path, variant):
    ours = _causal(tiny_llama)
    add_lora_(ours, "all-linear", rank=4, alpha=16, **variant)
    _perturb(ours, 0.1)
    save_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["use_dora"] == bool(variant.get("dora"))
    assert config["use_rslora"] == bool(variant.get("rslora"))
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    x = _ids(ours)
    theirs = _peft_loads_ours(ours, _causal(tiny_llama), tmp_path / "peft", x)
    if variant.get("dora"):  # the keys of PEFT's own DoRA save
        ref = get_peft_model(_causal(tiny_llama), LoraConfig(**{k: config[k] for k in ("r", "lora_alpha", "target_modules", "use_dora")}))
        assert set(load_file(tmp_path / "peft" / "adapter_model.safetensors")) == set(get_peft_model_state_dict(ref))
    assert theirs is not None


def test_peft_loads_per_module_ranks_and_alphas(tiny_llama, tmp_path):
    ours = _causal(tiny_llama)
    add_lora_(ours, ["query", "value"], rank=4, alpha=8)
    wrap_(ours, "model.layers.1.mlp.down_proj", lambda m: LoraLinear(m, rank=2, alpha=3.0))
    _perturb(ours, 0.1)
    save_peft(ours, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {"layers.1.mlp.down_proj": 2} and config["alpha_pattern"] == {"layers.1.mlp.down_proj": 3}
    # Suffixes would also adapt layer 0's down_proj: the exact names, then.
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                                        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj",
                                        "model.layers.1.self_attn.v_proj"]
    _peft_loads_ours(ours, _causal(tiny_llama), tmp_path / "peft", _ids(ours))


def test_peft_loads_our_gpt2_conv1d_lora(gpt2_dir, tmp_path):
    ours = _causal(gpt2_dir)
    add_lora_(ours, "all-linear", rank=4, dora=True)
    _perturb(ours, 0.1)
    save_peft(ours, tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    _peft_loads_ours(ours, _causal(gpt2_dir), tmp_path / "peft", _ids(ours))


def _peft_trained_a_step(model, config: LoraConfig, x):
    theirs = get_peft_model(model, config)
    theirs.train()
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    theirs(input_ids=x).logits.square().mean().backward()
    optimizer.step()
    return theirs.eval()


@pytest.mark.parametrize("which", ["bert", "llama-dora-rslora"])
def test_we_load_a_lora_peft_trained(which, bert_dir, tiny_llama, tmp_path):
    if which == "bert":
        make, config = (lambda: _bert(bert_dir)), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    else:
        make = lambda: _causal(tiny_llama)  # noqa: E731
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, use_rslora=True, task_type="CAUSAL_LM")
    x = _ids(make())
    theirs = _peft_trained_a_step(make(), config, x)
    assert any(p.abs().sum() > 0 for n, p in theirs.named_parameters() if "lora_B" in n)  # the step moved B
    theirs.save_pretrained(tmp_path / "peft")
    ours = make()
    wrapped = load_peft_(ours, tmp_path / "peft", name="from-peft")
    loras = [n for n, w in deltas(ours, "from-peft") if isinstance(w, LoraLinear)]
    assert len(loras) == (4 if which == "bert" else 14)
    if which == "bert":
        assert isinstance(ours.classifier, TrainedCopy) and "classifier" in wrapped  # SEQ_CLS saves the head whole
    torch.testing.assert_close(_out(ours, x), _out(theirs, x), **TOL)
    # and back: our PEFT copy of what we loaded is what PEFT saved
    save_peft(ours, tmp_path / "again", name="from-peft")
    saved, again = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_lora_stage_writes_a_peft_copy_that_peft_loads(tmp_path, write_recipe):
    recipe = write_recipe("- finetune: {max_steps: 2, eval_split: none}\n"
                          "- lora: {rank: 4, targets: [query, value], max_steps: 2, lr: 0.05, eval_split: none}\n")
    run = slimtune.run(recipe, out=tmp_path / "run")
    backbone, tuned = run.stages[0].path, run.stages[1].path
    assert (tuned / "peft" / "adapter_config.json").is_file()
    art = slimtune.load(tuned)  # the manifest covers peft/: loading verifies it
    x = _ids(art.model)
    theirs = PeftModel.from_pretrained(_bert(tuned), tuned / "peft").eval()  # the stage directory holds the bare backbone
    torch.testing.assert_close(_out(theirs, x), _out(art.model, x), **TOL)
    again = slimtune.load(backbone)
    load_peft_(again, tuned / "peft", name="lora")
    torch.testing.assert_close(_out(again.model, x), _out(art.model, x), **TOL)


def test_no_peft_copy_for_what_peft_cannot_load(tiny_llama, tmp_path):
    model = _causal(tiny_llama)
    quantize_(model, bits=4, group_size=32)
    add_lora_(model, "query", rank=2)
    with pytest.raises(SlimTuneError, match="quantized weight") as err:
        save_peft(model, tmp_path / "peft")
    assert "save_delta" in err.value.hint and not (tmp_path / "peft").exists()
    float_model = _causal(tiny_llama)
    add_lora_(float_model, "query", rank=2, name="a")
    add_lora_(float_model, "query", rank=2, name="b")  # nests around "a"
    with pytest.raises(SlimTuneError, match="wraps another delta"):
        save_peft(float_model, tmp_path / "peft", name="b")


def _edit(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "holds a PEFT 'IA3' adapter"),
    ({"bias": "all"}, "bias='all' is not supported"),
    ({"layer_replication": [[0, 1]]}, "options SlimTune's LoRA does not compute: layer_replication"),
    ({"r": 8}, "rank 8, its tensors have rank 4"),
])
def test_load_refuses_what_we_cannot_represent(bert_dir, tmp_path, change, message):
    theirs = get_peft_model(_bert(bert_dir), LoraConfig(r=4, target_modules=["query"]))
    theirs.save_pretrained(tmp_path / "peft")
    _edit(tmp_path / "peft", **change)
    ours = _bert(bert_dir)
    with pytest.raises(SlimTuneError, match=message):
        load_peft_(ours, tmp_path / "peft")
    assert not deltas(ours)  # nothing wrapped


def test_load_refuses_another_model(bert_dir, tiny_llama, tmp_path):
    get_peft_model(_bert(bert_dir), LoraConfig(r=4, target_modules=["query"])).save_pretrained(tmp_path / "peft")
    with pytest.raises(SlimTuneError, match="which this model does not have"):
        load_peft_(_causal(tiny_llama), tmp_path / "peft")
