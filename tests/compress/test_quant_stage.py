"""The ``quantize`` stage and ``quantize_``: module choice, schemes, RTN accuracy, artifacts, recipes, bad input."""

import pytest
import torch
from safetensors.torch import load_file

import slimtune
from slimtune.errors import SlimTuneError
from slimtune.compress import QuantLinear, quantize_
from slimtune.compress.kernels.reference import dequantize
from slimtune.compress.quant.stage import QuantizeConfig, select_schemes

from slimtune.models import parameter_count

from tests.compress.models import bert, llama
from tests.compress.test_prune_stage import cli, stage_dirs
from tests.conftest import recipe_text

SMALL = {"task.limit": 64}


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).mean() / (reference - approx).pow(2).mean()))


def quantized_names(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def test_default_choice_is_the_blocks_linears_and_patterns_refine_it():
    model = llama(layers=2)
    blocks = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert set(select_schemes(model, QuantizeConfig(group_size=32))) == blocks  # no lm_head by default
    chosen = select_schemes(model, QuantizeConfig(group_size=32, exclude=["*.mlp.*"], lm_head=True))
    assert set(chosen) == {n for n in blocks if ".mlp." not in n} | {"lm_head"}
    chosen = select_schemes(model, QuantizeConfig(group_size=32, include=[r"re:model\.layers\.[01]\.self_attn\.(q|v)_proj"]))
    assert set(chosen) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"}


def test_overrides_change_the_scheme_of_matching_modules_first_match_wins():
    config = QuantizeConfig(group_size=32, overrides={"*.down_proj": {"bits": 8}, "*.mlp.*": {"symmetric": True}})
    schemes = select_schemes(llama(layers=1), config)
    down, up, q = (schemes[f"model.layers.0.{p}"] for p in ("mlp.down_proj", "mlp.up_proj", "self_attn.q_proj"))
    assert (down.bits, down.group_size, down.symmetric) == (8, None, True)  # new bits: its default group size and symmetry
    assert (up.bits, up.group_size, up.symmetric) == (4, 32, True)
    assert (q.bits, q.group_size, q.symmetric) == (4, 32, False)  # 4-bit default: asymmetric
    schemes = select_schemes(llama(layers=1), QuantizeConfig(bits=8, overrides={"*.up_proj": {"bits": 4}}))
    up = schemes["model.layers.0.mlp.up_proj"]
    assert (up.bits, up.group_size, up.symmetric) == (4, 128, False)


@pytest.mark.parametrize("fields, min_db", [
    ({"bits": 8}, 35.0),
    ({"bits": 8, "activations": 8}, 25.0),
    ({"bits": 4, "group_size": 32}, 12.0),
    ({"bits": 4, "group_size": 32, "symmetric": False}, 12.0),
    ({"bits": 4, "group_size": "channel"}, 8.0),
])
def test_rtn_swaps_the_chosen_linears_and_keeps_the_output_close(fields, min_db):
    model = llama(layers=2)
    x = torch.randint(0, 40, (3, 11))
    float_count = parameter_count(model)
    with torch.no_grad():
        reference = model(x).logits
        report = quantize_(model, **fields)
        out = model(x).logits
    assert quantized_names(model) == set(report["modules"]) and len(report["modules"]) == 14
    assert report["bytes_after"] < report["bytes_before"]
    assert parameter_count(model) == float_count  # packed weights count as the weights they stand for
    assert sqnr_db(reference, out) > min_db
    linear = model.model.layers[0].mlp.up_proj
    assert linear.act_bits == fields.get("activations")


def test_quantized_artifact_round_trips_with_identical_outputs(tiny_llama, tmp_path):
    from slimtune.artifact import Artifact
    from slimtune.recipe import TaskConfig
    from slimtune.compress.quant.stage import module_swaps
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    quantize_(model, bits=4, group_size=32, symmetric=False, overrides={"*.o_proj": {"bits": 8}})
    art = Artifact(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_llama), task=TaskConfig(kind="causal-lm", data="x.csv", text="t"))
    art.swaps = module_swaps(model)
    art.save(tmp_path / "q")
    loaded = slimtune.load(tmp_path / "q")
    assert quantized_names(loaded.model) == quantized_names(model)
    x = torch.randint(0, 40, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded.model(x).logits, model(x).logits)
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert state[f"{q}.qweight"].dtype == torch.uint8 and f"{q}.weight" not in state and f"{q}.zeros" in state
    assert state["model.layers.0.self_attn.o_proj.qweight"].dtype == torch.int8
    w = dequantize(state[f"{q}.qweight"], state[f"{q}.scales"], state[f"{q}.zeros"], 4, 32, 32)
    assert torch.equal(w, loaded.model.get_submodule(q).dequantized_weight())


def test_recipe_quantizes_and_evaluates_and_info_shows_it(write_recipe, tmp_path, capsys):
    stages = "- quantize: {bits: 4, group_size: 32, exclude: ['*.attention.output.*']}\n- evaluate: {split: test, onnx: false}\n"
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    quantized, evaluated = result.stages[0], result.stages[1]
    assert quantized.metrics["quantized_modules"] == 10 and quantized.metrics["weight_mb"] < quantized.metrics["weight_mb_before"]
    assert "accuracy" in evaluated.metrics
    art = slimtune.load(evaluated.path)
    assert len(quantized_names(art.model)) == 10 and art.compression["quantize"]["method"] == "rtn"
    code, out, err = cli(capsys, "info", quantized.path)
    assert code == 0, err
    assert "module swaps" in out and "4-bit group 32 asymmetric (rtn): 10 modules" in out


def test_python_verb_errors_name_the_problem():
    model = bert(layers=1)
    with pytest.raises(SlimTuneError, match="calibration: method gptq needs calibration batches"):
        quantize_(model, method="gptq", bits=4, group_size=32)
    quantize_(model, bits=8)
    with pytest.raises(SlimTuneError, match="already quantized"):
        quantize_(model, bits=8)
    with pytest.raises(SlimTuneError, match=r"lm_head: the LM head \(lm_head\) shares its weight"):
        quantize_(llama(layers=1, tie_word_embeddings=True), group_size=32, lm_head=True)
    with pytest.raises(SlimTuneError, match="bits"):
        quantize_(llama(layers=1), bits=3)


BAD = [
    ("{bits: 3}", "bits=3 is not supported"),
    ("{bits: 4, group_size: 48}", "group_size=48 is not supported"),
    ("{bits: 8, symmetric: false}", "8-bit weights are symmetric"),
    ("{bits: 4, activations: 8}", "activations"),
    ("{method: gptq, qat: {epochs: 1}}", "qat"),
    ("{bits: 4, group_size: 32, overrides: {'*.query': {bits: 2}}}", "bits=2"),
]


@pytest.mark.parametrize("config, message", BAD)
def test_bad_quantize_config_is_an_error_and_writes_nothing(config, message, write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SlimTuneError, match=message):
        slimtune.run(write_recipe(f"- quantize: {config}\n"), overrides=SMALL, out=out)
    assert stage_dirs(out) == []


def test_bad_quantize_config_exits_2_from_the_cli(write_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_recipe("- quantize: {bits: 3}\n"), "--out", out)
    assert code == 2, err
    assert "stages.0.quantize" in err and "Traceback" not in err
    assert stage_dirs(out) == []


def test_quantizing_a_quantized_artifact_again_exits_2(write_recipe, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = cli(capsys, "run", write_recipe("- quantize: {bits: 8}\n- quantize: {bits: 8}\n"), "--out", out, "--set", "task.limit=64")
    assert code == 2, err
    assert "stages[1] quantize needs float linears, but stages[0] quantize already quantized the model" in err
    assert "Traceback" not in err
    assert stage_dirs(out) == []  # refused at validation: nothing written


def test_a_resolved_config_validates_again():
    """Ranks under torchrun read the resolved recipe, which spells out every default."""
    for config in ({"bits": 8}, {"method": "gptq", "group_size": "channel", "symmetric": False}, {"overrides": {"*.q": {"bits": 8}}}):
        resolved = QuantizeConfig.model_validate(config).model_dump()
        assert QuantizeConfig.model_validate(resolved).model_dump() == resolved


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_run_as_a_recipe_on_a_decoder(method, tiny_llama, tiny_csv, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    stages = f"- quantize: {{method: {method}, bits: 4, group_size: 32, calibration: {{batches: 2}}}}\n- evaluate: {{split: test, onnx: false}}\n"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, stages, kind="causal-lm"))
    result = slimtune.run(recipe, overrides=SMALL, out=tmp_path / "run")
    record = slimtune.load(result.stages[1].path).compression["quantize"]
    assert record["method"] == method and len(record["modules"]) == 14
    assert {m["method"] for m in record["modules"].values()} == {method}
    assert result.stages[1].metrics["perplexity"] > 1


def test_qat_trains_then_converts_to_the_packed_format(write_recipe, tmp_path):
    stages = "- quantize: {bits: 4, group_size: 32, qat: {epochs: 1, distill: true}, embeddings: 8}\n"
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    metrics = result.stages[0].metrics
    assert metrics["recover_steps"] == 4 and "accuracy" in metrics
    art = slimtune.load(result.stages[0].path)
    record = art.compression["quantize"]
    assert record["method"] == "qat" and record["embedding"] == "bert.embeddings.word_embeddings"
    assert len(quantized_names(art.model)) == 12
    assert not any("FakeQuant" in type(m).__name__ for m in art.model.modules())
    assert type(art.model.bert.embeddings.word_embeddings).__name__ == "QuantEmbedding"


def test_a_tied_head_is_quantized_with_the_embedding_never_alone():
    model = llama(layers=1, tie_word_embeddings=True)
    with pytest.raises(SlimTuneError, match=r"lm_head: the LM head \(lm_head\) shares its weight"):
        quantize_(model, bits=8, include=["*proj", "lm_head"])
    report = quantize_(model, bits=8, embeddings=8, lm_head=True)
    assert report["embedding"] == "model.embed_tokens" and "lm_head" not in report["modules"]
    assert parameter_count(model) == parameter_count(llama(layers=1, tie_word_embeddings=True))  # the table counts once
    head, table = model.get_output_embeddings(), model.get_input_embeddings()
    assert isinstance(head, QuantLinear) and head.qweight is table.qweight and head.scales is table.scales


@pytest.mark.distributed
def test_qat_agrees_under_single_ddp_and_fsdp(write_recipe, tmp_path):
    from slimtune.distributed.testing import compare_strategies

    recipe = write_recipe("- quantize: {bits: 4, group_size: 32, qat: {epochs: 1}}\n")
    # The latent fp32 weights differ only by summation order: a gradient sums K = 16 x 16 = 256
    # terms (K * u = 1.5e-5 relative, doubled by Adam's m / sqrt(v)), over T = 4 steps of at most
    # lr = 5e-3: delta = 4 * 5e-3 * 3e-5 = 6e-7, times 4 for feedback = 2.4e-6 (scales, biases, norms).
    # A code flips, by one level, only where a weight lies within delta of a rounding boundary:
    # boundaries are a scale apart (>= 3e-3 here: the fixture's weights, std 0.02, span >= 0.045 per
    # group of 32, over 15 steps), so at most 2 * delta / 3e-3 = 1.6e-3 of the codes, 3.2e-3 of the
    # bytes that pack two codes each.
    delta = 2.4e-6
    report = compare_strategies(recipe, tmp_path, overrides=SMALL, atol=delta, code_tol=2 * 2 * delta / 3e-3)
    assert report.ok, str(report)
    assert ("fsdp", "quantize") in report.weight_diff and ("fsdp", "quantize") in report.code_diff
    reference = load_file(str(report.runs["single"].stages[0].path / "model.safetensors"))
    for name in ("ddp", "fsdp"):
        other = load_file(str(report.runs[name].stages[0].path / "model.safetensors"))
        for key, codes in reference.items():
            if codes.dtype == torch.uint8:  # two 4-bit codes a byte: each may move by one level at most
                for shift in (0, 4):
                    step = ((codes >> shift) & 15).int() - ((other[key] >> shift) & 15).int()
                    assert step.abs().max() <= 1, (name, key)
