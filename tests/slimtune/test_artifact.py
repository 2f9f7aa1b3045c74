import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import slimtune
from slimtune.artifact import Artifact
from slimtune.errors import ArtifactError
from slimtune.models import load_pretrained
from slimtune.recipe import TaskConfig
from slimtune.registry import MODULE_TYPES, register_module_type

TASK = TaskConfig(kind="classification", data="unused.csv", text="review", label="sentiment", max_length=16)


def make_artifact(tiny_bert) -> Artifact:
    model, tokenizer = load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=2)
    return Artifact(model=model.eval(), tokenizer=tokenizer, task=TASK, labels=[0, 1],
                    lineage=[{"stage": "source", "model": str(tiny_bert), "key": "k0"}])


def test_save_load_round_trip_is_bit_exact(tmp_path, tiny_bert):
    art = make_artifact(tiny_bert)
    art.save(tmp_path / "a")
    back = slimtune.load(tmp_path / "a")
    before, after = art.model.state_dict(), back.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ids = torch.randint(5, 20, (3, 9))
    with torch.no_grad():
        assert torch.equal(art.model(input_ids=ids).logits, back.model(input_ids=ids).logits)
    assert back.lineage[0]["sha256"] and back.task == TASK and back.labels == [0, 1]
    assert not back.model.training
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary directory was renamed


def test_classification_artifact_loads_with_plain_transformers(tmp_path, tiny_bert):
    from transformers import AutoModelForSequenceClassification

    art = make_artifact(tiny_bert)
    art.save(tmp_path / "a")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a").eval()
    ids = torch.randint(5, 20, (2, 7))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, art.model(input_ids=ids).logits)


def test_causal_lm_with_tied_embeddings_round_trips(tmp_path, tiny_llama):

    model, tok = load_pretrained(str(tiny_llama), "AutoModelForCausalLM")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    task = TaskConfig(kind="causal-lm", data="unused.csv", max_length=16)
    Artifact(model=model, tokenizer=tok, task=task).save(tmp_path / "lm")
    back = slimtune.load(tmp_path / "lm")
    assert back.model.lm_head.weight.data_ptr() == back.model.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(v, back.model.state_dict()[k]) for k, v in model.state_dict().items())


@register_module_type
class ScaledLinear(nn.Module):
    """A stand-in for a swapped layer (e.g. a quantized linear) to test swap replay."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.scale = nn.Parameter(torch.ones(out_features))

    @classmethod
    def from_config(cls, config: dict) -> "ScaledLinear":
        return cls(config["in_features"], config["out_features"])

    def forward(self, x):
        return nn.functional.linear(x, self.weight) * self.scale


def test_module_swaps_are_rebuilt_on_load(tmp_path, tiny_bert):
    art = make_artifact(tiny_bert)
    layer = art.model.bert.encoder.layer[0].attention.self
    swapped = ScaledLinear(32, 32)
    with torch.no_grad():
        swapped.weight.copy_(layer.query.weight)
        swapped.scale.uniform_(0.5, 1.5)
    layer.query = swapped
    art.swaps = [{"module": "bert.encoder.layer.0.attention.self.query", "type": "ScaledLinear", "config": {"in_features": 32, "out_features": 32}}]
    art.save(tmp_path / "s")
    back = slimtune.load(tmp_path / "s")
    assert isinstance(back.model.bert.encoder.layer[0].attention.self.query, ScaledLinear)
    assert "ScaledLinear" in str(back.model)
    assert torch.equal(back.model.bert.encoder.layer[0].attention.self.query.scale, swapped.scale)
    assert "bert.encoder.layer.0.attention.self.query.scale" in load_file(tmp_path / "s" / "model.safetensors")


def test_unregistered_swap_type_is_a_clear_error(tmp_path, tiny_bert):
    art = make_artifact(tiny_bert)
    art.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "slimtune.json").read_text())
    meta["swaps"] = [{"module": "classifier", "type": "Nope", "config": {}}]
    (tmp_path / "a" / "slimtune.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="'Nope' is not registered"):
        slimtune.load(tmp_path / "a")
    assert "ScaledLinear" in MODULE_TYPES


def test_load_errors(tmp_path, tiny_bert):
    with pytest.raises(ArtifactError, match="does not exist"):
        slimtune.load(tmp_path / "missing")
    with pytest.raises(ArtifactError, match="not a SlimTune artifact"):
        slimtune.load(tiny_bert)


def test_save_writes_metrics_json_as_a_stage_does_and_load_reads_it_back(tmp_path, tiny_bert):
    from slimtune.artifact import read_metrics, verify

    art = make_artifact(tiny_bert)
    art.save(tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "metrics.json").read_text()) == {}  # nothing measured yet
    art.metrics = {"accuracy": 0.75, "split": "test", "parameters": 12345}
    art.save(tmp_path / "measured")
    assert read_metrics(tmp_path / "measured") == art.metrics
    verify(tmp_path / "measured")  # the manifest leaves metrics.json out, as in a stage directory
    back = slimtune.load(tmp_path / "measured")
    assert back.metrics == art.metrics
    back.save(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in (tmp_path / "measured").iterdir())
    assert read_metrics(tmp_path / "copy") == art.metrics
