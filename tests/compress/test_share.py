"""Cross-layer parameter sharing: surgery, gradients, artifacts, the ``share`` stage."""

import copy
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoTokenizer, BertForSequenceClassification

import slimtune
from slimtune.artifact import Artifact
from slimtune.cli import main
from slimtune import arch
from slimtune.compress import share_layers_
from slimtune.compress.share import retie_, sharing_intact
from slimtune.distributed.testing import compare_strategies
from slimtune.errors import RecipeError, SlimTuneError
from slimtune.models import parameter_count
from slimtune.recipe import TaskConfig
from tests.compress.models import bert, llama as tiny_llama_lm


CLASSIFY = TaskConfig(kind="classification", data="unused.csv", text="review", label="sentiment", max_length=16)
CAUSAL = TaskConfig(kind="causal-lm", data="unused.csv", max_length=16)


def llama(layers: int = 4, vocab: int = 40, seed: int = 0) -> nn.Module:
    return tiny_llama_lm(layers, seed, vocab, tie_word_embeddings=True)  # tied, as SmolLM2


MODELS = {"bert": bert, "llama": llama}


def block_params(model, i) -> dict[str, nn.Parameter]:
    return dict(arch.layers(model)[i].named_parameters())


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("init", ["mean", "first", 1])
def test_members_hold_one_parameter_object_with_the_requested_initial_value(family, init):
    model = MODELS[family](layers=5)
    before = copy.deepcopy(model)
    groups = [[3, 0], [1, 4]]  # a member order other than sorted; layer 2 stays alone
    report = share_layers_(model, groups=groups, init=init)
    assert report["groups"] == groups and report["init"] == init
    for group in groups:
        lead = block_params(model, group[0])
        originals = [block_params(before, i) for i in group]
        for i in group[1:]:
            assert all(p is lead[n] for n, p in block_params(model, i).items())
        for name, p in lead.items():
            if init == "mean":
                expected = sum(o[name].detach() for o in originals) / len(group)
                torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
            else:
                expected = originals[0 if init == "first" else init][name]
                assert torch.equal(p.detach(), expected.detach())
    assert all(torch.equal(p, block_params(before, 2)[n]) for n, p in block_params(model, 2).items())
    assert all(p is not block_params(model, 0)[n] for n, p in block_params(model, 2).items())


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_unique_parameters_drop_by_the_members_beyond_the_first_times_the_block_size(family):
    model = MODELS[family](layers=5)
    block = parameter_count(arch.layers(model)[0])
    total = parameter_count(model)
    report = share_layers_(model, every=2)  # [[0, 1], [2, 3], [4]]
    assert report["groups"] == [[0, 1], [2, 3], [4]]
    assert report["unique_parameters_before"] == total
    assert report["unique_parameters_after"] == parameter_count(model) == total - 2 * block
    assert len({id(p) for p in model.parameters()}) < len(list(model.named_parameters(remove_duplicate=False)))


def test_gradient_of_a_shared_parameter_is_the_sum_over_its_layers():
    shared = bert(layers=2)
    share_layers_(shared, every=2, init="first")
    unshared = bert(layers=2)  # same seed; make layer 1 a separate copy of layer 0
    arch.layers(unshared)[1].load_state_dict(arch.layers(unshared)[0].state_dict())
    ids = torch.randint(5, 40, (3, 7))
    for model in (shared, unshared):
        model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss.backward()
    with torch.no_grad():
        assert torch.allclose(shared(input_ids=ids).logits, unshared(input_ids=ids).logits, atol=1e-6)
    for name, p in block_params(shared, 0).items():
        expected = block_params(unshared, 0)[name].grad + block_params(unshared, 1)[name].grad
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    # an optimizer step moves every member alike
    torch.optim.AdamW(shared.parameters(), lr=1e-2).step()
    assert sharing_intact(shared, [[0, 1]])
    assert not torch.equal(block_params(shared, 0)["attention.self.query.weight"], block_params(unshared, 0)["attention.self.query.weight"])


@pytest.mark.parametrize("family,task", [("bert", CLASSIFY), ("llama", CAUSAL)])
def test_shared_artifact_round_trips_with_sharing_intact_and_stores_shared_tensors_once(family, task, tmp_path, tiny_bert):
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    plain, model = (MODELS[family](layers=4, vocab=len(tokenizer)) for _ in range(2))
    block = parameter_count(arch.layers(model)[0])
    share_layers_(model, groups=[[0, 1, 2]], init="mean")
    for name, m in (("plain", plain), ("shared", model)):
        Artifact(model=m, tokenizer=tokenizer, task=task, labels=[0, 1] if family == "bert" else None).save(tmp_path / name)
    back = slimtune.load(tmp_path / "shared").model
    assert sharing_intact(back, [[0, 1, 2]])
    assert not sharing_intact(back, [[2, 3]])
    assert parameter_count(back) == parameter_count(model)
    ids = torch.randint(5, len(tokenizer), (2, 9))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
    stored, full = load_file(tmp_path / "shared/model.safetensors"), load_file(tmp_path / "plain/model.safetensors")
    per_block = len(block_params(model, 0))
    assert len(full) - len(stored) == 2 * per_block
    saved_bytes = (tmp_path / "plain/model.safetensors").stat().st_size - (tmp_path / "shared/model.safetensors").stat().st_size
    assert 0 <= saved_bytes - 2 * block * 4 < 200 * 2 * per_block  # fp32 data, plus one header entry per removed key
    meta = json.loads((tmp_path / "shared/slimtune.json").read_text())
    assert set(meta["ties"]) - {"lm_head.weight"} == {k for k in full if k not in stored}
    if family == "llama":
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_retie_restores_sharing_lost_to_a_copy_and_refuses_diverged_members():
    model = bert(layers=4)
    share_layers_(model, groups=[[0, 1], [2, 3]])
    intermediate = arch.layers(model)[1].intermediate
    intermediate.dense.weight = nn.Parameter(intermediate.dense.weight.detach().clone())  # equal value, own object
    assert not sharing_intact(model, [[0, 1], [2, 3]])
    retie_(model, [[0, 1], [2, 3]])
    assert sharing_intact(model, [[0, 1], [2, 3]])
    intermediate.dense.weight = nn.Parameter(intermediate.dense.weight.detach() + 1)
    with pytest.raises(RuntimeError, match="diverged in intermediate.dense.weight"):
        retie_(model, [[0, 1]])


def pruned_layer_1(model):
    """Layer 1's FFN narrowed, as structured pruning leaves it."""
    layer = arch.layers(model)[1]
    layer.intermediate.dense, layer.output.dense = nn.Linear(32, 48), nn.Linear(48, 32)
    return model


@pytest.mark.parametrize("kwargs,field", [
    ({"groups": [[0, 7]]}, "groups: layer(s) [7] do not exist"),
    ({"groups": [[0, 1], [1, 2]]}, "groups: layer indices"),
    ({"groups": [[0, 1], []]}, "groups:"),
    ({"every": 1}, "every: 1 must be"),
    ({"groups": [[0, 1]], "every": 2}, "exactly one of groups and every"),
    ({}, "exactly one of groups and every"),
    ({"groups": [[0, 1], [2, 3]], "init": 2}, "init: member 2 does not exist in group [0, 1]"),
    ({"every": 2, "init": "median"}, "init: 'median'"),
])
def test_bad_arguments_raise_an_error_naming_the_field(kwargs, field):
    model = bert(layers=4)
    with pytest.raises(SlimTuneError) as err:
        share_layers_(model, **kwargs)
    assert field in err.value.message
    assert len({id(p) for p in model.parameters()}) == len(list(model.named_parameters(remove_duplicate=False)))  # untouched


def test_layers_of_different_widths_cannot_share():
    model = pruned_layer_1(bert(layers=4))
    with pytest.raises(SlimTuneError, match=r"groups: layers 0 and 1 have different shapes .*intermediate.dense.weight"):
        share_layers_(model, every=2)
    share_layers_(model, groups=[[0, 2, 3]])  # the unpruned ones still can


@pytest.mark.parametrize("stage,message", [
    ("- share: {groups: [[0, 5]]}\n", "stages[0] share: layers [5] do not exist; the model entering it has 2 layers"),
    ("- share: {groups: [[0, 1], [1]]}\n", "stages.0.share.groups"),
    ("- share: {every: 1}\n", "stages.0.share.every"),
    ("- share: {every: 2, groups: [[0, 1]]}\n", "exactly one of groups and every"),
    ("- share: {every: 2, init: 3}\n", "init: member 3 does not exist"),
])
def test_bad_share_stage_is_a_recipe_error_and_writes_no_stage(stage, message, write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as err:
        slimtune.run(write_recipe(stage), out=out)
    assert message in str(err.value)
    assert not list(out.glob("*share*")) and not list(out.glob(".*tmp*"))


def test_cli_exits_2_on_layers_that_cannot_share(write_recipe, tmp_path, capsys):
    code = main(["run", str(write_recipe("- share: {groups: [[0, 2]]}\n")), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "stages[0] share: layers [2] do not exist; the model entering it has 2 layers" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "01-share").exists()


def test_finetune_then_share_with_recovery_end_to_end(write_recipe, tmp_path):
    stages = ("- finetune: {epochs: 1}\n- evaluate: {latency: false}\n"
              "- share: {every: 2, recover: {epochs: 1}}\n- evaluate: {latency: false}\n")
    result = slimtune.run(write_recipe(stages), out=tmp_path / "run", overrides={"task.limit": 96})
    finetuned, dense, shared, small = result.stages
    art = slimtune.load(shared.path)
    assert sharing_intact(art.model, [[0, 1]])
    block = parameter_count(arch.layers(art.model)[0])
    assert shared.metrics["unique_parameters_before"] - shared.metrics["unique_parameters_after"] == block
    assert art.compression["share"] == {"groups": [[0, 1]], "init": "mean", "unique_parameters": shared.metrics["unique_parameters_after"]}
    assert shared.metrics["recover_steps"] > 0 and "accuracy" in shared.metrics
    assert small.metrics["parameters"] == shared.metrics["parameters"] == dense.metrics["parameters"] - block
    saved_bytes = (dense.metrics["size_mb"] - small.metrics["size_mb"]) * 1e6  # the weight file, shared tensors stored once
    assert 0 <= saved_bytes - block * 4 < 200 * len(list(arch.layers(art.model)[0].parameters()))
    after = slimtune.load(small.path)  # a stage that links the weights keeps the ties too
    assert sharing_intact(after.model, [[0, 1]]) and after.lineage[-1]["stage"] == "evaluate"


def test_recovery_by_distillation_trains_the_shared_weights(write_recipe, tmp_path, tiny_bert):
    stage = "- share: {every: 2, init: first, recover: {epochs: 1, distill: true, max_steps: 2, eval_split: none}}\n"
    result = slimtune.run(write_recipe(stage), out=tmp_path / "run", overrides={"task.limit": 64})
    trained = slimtune.load(result.stages[0].path).model
    source = BertForSequenceClassification.from_pretrained(tiny_bert)
    assert result.stages[0].metrics["recover_steps"] == 2 and sharing_intact(trained, [[0, 1]])
    query = "attention.self.query.weight"
    assert not torch.equal(block_params(trained, 0)[query], block_params(source, 0)[query])  # moved from the init...
    assert block_params(trained, 1)[query] is block_params(trained, 0)[query]  # ...as one tensor


@pytest.mark.distributed
def test_share_with_recovery_gives_the_same_result_under_single_ddp_and_fsdp(write_recipe, tmp_path):
    stages = "- share: {every: 2, recover: {epochs: 1, distill: true}}\n"
    report = compare_strategies(write_recipe(stages), tmp_path, overrides={"task.limit": 96})
    assert report.ok, str(report)
    assert {("ddp", "share"), ("fsdp", "share")} <= set(report.weight_diff)
    for run in report.runs.values():
        art = slimtune.load(run.stages[0].path)
        assert sharing_intact(art.model, [[0, 1]]) and run.stages[0].metrics["recover_steps"] > 0


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_after_share_quantizes_each_shared_weight_once_and_keeps_it_shared(family, bits, tmp_path, tiny_bert):
    """Issue 13, defect 1: RTN used to quantize blocks 0 and 2 only, leaving 1 and 3 float and the model larger."""
    from slimtune.compress import quantize_
    from slimtune.compress.quant.stage import module_swaps, weight_bytes

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = MODELS[family](layers=4, vocab=len(tokenizer))
    share_layers_(model, every=2)
    ids = torch.randint(5, len(tokenizer), (2, 9))
    shared_bytes = weight_bytes(model)
    report = quantize_(model, bits=bits, group_size=32 if bits == 4 else "channel")
    floats = [n for i in range(4) for n, m in arch.layers(model)[i].named_modules() if isinstance(m, nn.Linear)]
    assert floats == []
    per_block = sum(isinstance(m, nn.Module) and hasattr(m, "qweight") for m in arch.layers(model)[0].modules())
    assert len(report["modules"]) == 4 * per_block  # every block's linears, each member's listed
    assert sum("shared_with" in entry for entry in report["modules"].values()) == 2 * per_block
    assert sharing_intact(model, [[0, 1], [2, 3]]) and not sharing_intact(model, [[1, 2]])
    assert report["bytes_after"] < shared_bytes  # it shrank (before the fix it grew: float copies beside packed ones)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    art = Artifact(model=model, tokenizer=tokenizer, task=CLASSIFY if family == "bert" else CAUSAL,
                   labels=[0, 1] if family == "bert" else None, swaps=module_swaps(model))
    art.save(tmp_path / "q")
    stored = load_file(tmp_path / "q/model.safetensors")
    assert not [k for k in stored if re.search(r"layers?\.[13]\.", k)]  # the members' tensors are stored once, by the leads
    back = slimtune.load(tmp_path / "q").model
    assert sharing_intact(back, [[0, 1], [2, 3]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, expected)


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_quantization_of_shared_layers_is_refused_with_the_fix(method):
    from slimtune.compress import quantize_

    model = bert(layers=4)
    share_layers_(model, every=2)
    batches = [{"input_ids": torch.randint(5, 40, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}]
    with pytest.raises(SlimTuneError, match="shares its weight") as err:
        quantize_(model, method=method, bits=4, group_size=32, batches=batches)
    assert "method: rtn" in err.value.hint
    assert all(isinstance(m, nn.Linear) for i in range(4) for m in arch.layers(model)[i].modules() if hasattr(m, "in_features"))


def test_share_over_differently_pruned_layers_recomputes_the_sparsity_and_says_so(write_recipe, tmp_path, tiny_bert_6_layers, caplog, capsys):
    """Issue 13, defect 4: info printed the 2:4 record of the pruning that share's mean had undone."""
    import logging

    from slimtune.compress.invariants import holds_pattern, weight_of

    recipe = write_recipe("- prune: {method: magnitude, pattern: '2:4'}\n- share: {every: 2, init: mean}\n", model=tiny_bert_6_layers)
    with caplog.at_level(logging.WARNING):
        result = slimtune.run(recipe, out=tmp_path / "run")
    shared = result.artifact
    record = shared.compression["prune"]
    weights = [weight_of(shared.model, n) for n in record["modules"]]
    measured = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert record["overall"] == pytest.approx(measured, abs=0) and measured < 0.5
    assert record["pattern"] is None and not all(holds_pattern(w, "2:4") for w in weights)
    assert "stage 02-share: the pruned weights changed: sparsity 0.5000 -> " in caplog.text
    assert "the 2:4 pattern no longer holds" in caplog.text
    assert main(["info", str(result.stages[-1].path)]) == 0
    shown = capsys.readouterr().out
    assert f"overall {measured:.4f} (magnitude, target 0.5, scope layer)" in shown
    assert "a later stage changed it: sparsity 0.5000 -> " in shown and "pattern 2:4" not in shown


def test_share_with_init_first_keeps_the_pruning_it_copies(write_recipe, tmp_path, tiny_bert_6_layers, caplog):
    import logging

    recipe = write_recipe("- prune: {method: magnitude, pattern: '2:4'}\n- share: {every: 2, init: first}\n", model=tiny_bert_6_layers)
    with caplog.at_level(logging.WARNING):
        result = slimtune.run(recipe, out=tmp_path / "run")
    assert result.artifact.compression["prune"]["pattern"] == "2:4"
    assert "pruned weights changed" not in caplog.text
