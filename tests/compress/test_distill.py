"""Distillation: the losses, students built from a teacher, the objective and its cache, ``distill()``, the stage."""

import copy
import json

import pandas as pd
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification

import slimtune
from slimtune import arch
from slimtune.compress import distill
from slimtune.compress.distill import (DistillationModel, StudentSpec, attention_kl, build_student,
                                       embedding_loss, hidden_mse, soft_kl, uniform_layer_map)
from slimtune.distributed.testing import compare_strategies
from slimtune.errors import RecipeError
from slimtune.models import load_pretrained
from slimtune.recipe import TrainConfig
from slimtune.tasks import Collator

from tests.conftest import tiny_texts
from tests.slimtune.test_cli import slimtune_cli
from tests.compress.models import bert, llama

TRAIN = TrainConfig(batch_size=16, lr=2e-3, warmup_ratio=0.0, device="cpu")
ALL_LOSSES = {"soft": 1.0, "hard": 1.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0}




def examples(n: int, labelled: bool = True) -> list[dict]:
    """Tiny sentences of varying length (so batches pad differently from epoch to epoch)."""
    rows = [{"text": text + " the movie" * (i % 3), "label": label} for i, (text, label) in enumerate(tiny_texts(n))]
    return rows if labelled else [{"text": r["text"]} for r in rows]


# ---------------------------------------------------------------- losses


def test_losses_are_zero_for_equal_inputs_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    s3, t3 = torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 9, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    h_s, h_t = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    a_s, a_t = torch.randn(2, 3, 6, 6, generator=g).softmax(-1), torch.randn(2, 3, 6, 6, generator=g).softmax(-1)
    pairs = [
        (lambda x, y: soft_kl(x, y, 2.0), s, t),
        (lambda x, y: soft_kl(x, y, 1.0, mask), s3, t3),
        (lambda x, y: embedding_loss(x, y, "cosine"), s, t),
        (lambda x, y: embedding_loss(x, y, "mse"), s, t),
        (lambda x, y: hidden_mse(x, y, mask), h_s, h_t),
        (lambda x, y: attention_kl(x, y, mask), a_s, a_t),
        (attention_kl, a_s[:, :2], a_t),  # fewer student heads: head-averaged distributions
    ]
    for loss, x, y in pairs:
        assert abs(loss(y, y).item()) < 1e-6  # exactly 0 up to rounding (1 - cos(x, x))
        assert loss(x, y).item() > 1e-4


def test_soft_kl_is_t_squared_times_kl_of_softened_distributions():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    for T in (1.0, 2.0, 4.0):
        p_t = (t / T).softmax(-1)
        direct = (p_t * (p_t.log() - (s / T).log_softmax(-1))).sum(-1).mean() * T**2
        torch.testing.assert_close(soft_kl(s, t, T), direct)
    # bf16 logits are computed in fp32
    assert soft_kl(s.bfloat16(), t.bfloat16(), 2.0).dtype == torch.float32


def test_masked_losses_ignore_padding_positions():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s2 = s.clone()
    s2[0, 3:] = 100.0  # garbage at padding
    torch.testing.assert_close(soft_kl(s, t, 2.0, mask), soft_kl(s2, t, 2.0, mask))
    torch.testing.assert_close(hidden_mse(s, t, mask), hidden_mse(s2, t, mask))
    # the masked mean is the mean over real positions only
    real = mask.bool()
    expected = ((s - t).pow(2).mean(-1))[real].mean()
    torch.testing.assert_close(hidden_mse(s, t, mask), expected)


# ---------------------------------------------------------------- students


@pytest.mark.parametrize("make", [bert, llama])
@pytest.mark.parametrize("spec, kept", [({"layers": [0, 1]}, [0, 1]), ({"layers": [1, 3]}, [1, 3]),
                                        ({"first": 3}, [0, 1, 2]), ({"layers": "every_other"}, [0, 2])])
def test_layer_student_keeps_the_chosen_teacher_layers_with_their_weights(make, spec, kept):
    teacher = make(layers=4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = build_student(teacher, spec)
    assert arch.num_layers(student) == student.config.num_hidden_layers == len(kept)
    for new, old in enumerate(kept):
        s_block, t_block = arch.layers(student)[new].state_dict(), arch.layers(teacher)[old].state_dict()
        assert s_block.keys() == t_block.keys()
        assert all(torch.equal(s_block[k], t_block[k]) for k in s_block)
    blocks = {id(p) for p in arch.layers(student).parameters()}
    outside = {k: v for k, v in student.named_parameters() if id(v) not in blocks}
    teacher_params = dict(teacher.named_parameters())
    assert outside and all(torch.equal(v, teacher_params[k]) for k, v in outside.items())  # embeddings, norm, head
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(student.parameters(), teacher.parameters()))
    assert arch.num_layers(teacher) == 4 and all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("make", [bert, llama])
def test_narrow_student_has_the_requested_shape_and_runs(make):
    teacher = make(layers=4)
    student = build_student(teacher, {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 24})
    assert type(student) is type(teacher) and arch.num_layers(student) == 2
    assert student.config.hidden_size == 16 and arch.attention(student, 0).heads == 2
    assert arch.ffn(student, 0).output.in_features == 24
    out = student(input_ids=torch.tensor([[2, 5, 7, 3]])).logits
    assert out.shape[-1] == teacher(input_ids=torch.tensor([[2, 5, 7, 3]])).logits.shape[-1]


@pytest.mark.parametrize("spec, field", [({"layers": [0, 9]}, "student.layers"), ({"first": 5}, "student.first"),
                                         ({"hidden_size": 30, "num_heads": 4}, "student.num_heads")])
def test_impossible_students_raise_a_recipe_error_naming_the_field(spec, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        build_student(bert(layers=4), spec)


def test_student_spec_takes_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StudentSpec(layers=[0], hidden_size=16)
    with pytest.raises(ValueError, match="exactly one"):
        StudentSpec()


def test_uniform_layer_map_maps_last_to_last():
    assert uniform_layer_map(3, 6) == {0: 1, 1: 3, 2: 5}
    assert uniform_layer_map(2, 2) == {0: 0, 1: 1}
    assert uniform_layer_map(4, 2) == {0: 0, 1: 0, 2: 1, 3: 1}  # deeper student: every teacher layer exists


# ---------------------------------------------------------------- distill()


def bert_teacher(tiny_bert):
    torch.manual_seed(0)
    model, tokenizer = load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=2)
    return model, Collator(tokenizer, 16, "classification")


def objective_value(setup, student, batches) -> float:
    """The distillation loss of ``student`` (through a fresh wrapper) on fixed batches."""
    for model in (student, setup.objective.teacher):  # attention probabilities need eager attention
        model.set_attn_implementation("eager")
    wrapper = DistillationModel(student, setup.weights, setup.layer_map, setup.objective.teacher.config.hidden_size)
    with torch.no_grad():
        return sum(setup.objective(wrapper.eval(), b)[0].item() for b in batches) / len(batches)


def test_short_distillation_lowers_the_students_distillation_loss(tiny_bert):
    teacher, collate = bert_teacher(tiny_bert)
    train = examples(64)
    torch.manual_seed(0)
    student = build_student(teacher, {"num_layers": 1})  # random init at the teacher's width: far from the teacher
    initial = copy.deepcopy(student)
    result = distill(teacher, student, train, collate=collate, train=TRAIN, epochs=2,
                     losses={"soft": 1.0, "hidden": 1.0, "attention": 1.0}, temperature=2.0)
    batches = [collate(train[i:i + 16]) for i in range(0, 64, 16)]
    before, after = objective_value(result.distillation, initial, batches), objective_value(result.distillation, result.student, batches)
    assert after < 0.7 * before, (before, after)
    assert result.student.config._attn_implementation == teacher.config._attn_implementation  # eager was undone
    assert arch.num_layers(result.student) == 1 and arch.num_layers(teacher) == 2


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_cached_teacher_is_not_run_in_epoch_two_and_gives_the_same_training(family, tiny_bert, tiny_llama):
    if family == "bert":
        teacher, collate = bert_teacher(tiny_bert)
        kind, losses = "classification", ALL_LOSSES
    else:
        teacher, tokenizer = load_pretrained(str(tiny_llama), "AutoModelForCausalLM")
        collate, kind = Collator(tokenizer, 16, "causal-lm"), "causal-lm"
        losses = {"soft": 1.0, "hard": 1.0, "hidden": 1.0, "attention": 1.0}
    calls = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    runs = {}
    for cache in (False, True):
        calls.clear()
        spec = {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}  # projections train too
        runs[cache] = distill(teacher, spec, examples(40), collate=collate, kind=kind, train=TRAIN, epochs=2, losses=losses,
                              cache_teacher=cache, eval_fn=lambda m: {"teacher_calls": len(calls)})
    cached, plain = runs[True].train.history, runs[False].train.history
    assert cached[0]["teacher_calls"] == cached[1]["teacher_calls"] == 3  # 3 batches in epoch 1, none in epoch 2
    assert plain[1]["teacher_calls"] == 2 * plain[0]["teacher_calls"] == 6
    assert len(runs[True].distillation.objective.cache) == 40
    for a, b in zip(cached, plain):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=1e-6)
    cached_state, plain_state = runs[True].student.state_dict(), runs[False].student.state_dict()
    for k in plain_state:
        torch.testing.assert_close(cached_state[k], plain_state[k], atol=1e-5, rtol=1e-4)


def test_embedding_distillation_on_raw_text_without_labels(tiny_bert):
    teacher, tokenizer = load_pretrained(str(tiny_bert), "AutoModel")
    collate = Collator(tokenizer, 16, "embedding")
    spec = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}
    result = distill(teacher, spec, examples(48, labelled=False), collate=collate, kind="embedding", train=TRAIN, epochs=2,
                     embedding_kind="mse")
    assert result.distillation.weights.active() == {"embedding": 1.0}
    assert "embedding" in result.distillation.model.projections  # 16 -> 32, trained with the student
    first, last = result.train.history[0]["train_loss"], result.train.history[-1]["train_loss"]
    assert last < first
    with pytest.raises(RecipeError, match="losses.hard"):
        distill(teacher, spec, examples(16, labelled=False), collate=collate, kind="embedding", train=TRAIN, losses={"hard": 1.0})
    with pytest.raises(RecipeError, match="losses.soft"):
        distill(teacher, spec, examples(16), collate=collate, kind="embedding", train=TRAIN, losses={"soft": 1.0})


# ---------------------------------------------------------------- the stage


@pytest.mark.parametrize("stage, message", [
    ("- distill: {student: {layers: [0]}, layer_map: {0: 5}, losses: {soft: 1.0, hidden: 1.0}}\n", "layer_map"),
    ("- distill: {student: {layers: [0]}, layer_map: {3: 1}, losses: {hidden: 1.0}}\n", "layer_map"),
    ("- distill: {student: {layers: [0, 4]}}\n", "student.layers"),
    ("- distill: {student: {layers: [0]}, temperature: 0}\n", "temperature"),
    ("- distill: {student: {layers: [0]}, losses: {soft: 1.0, dark: 1.0}}\n", "dark"),
])
def test_bad_distill_stage_is_a_recipe_error_and_writes_no_stage(stage, message, write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=message):
        slimtune.run(write_recipe(stage), out=out)
    assert not out.exists() or not any(out.glob("*distill*"))


def test_cli_exits_2_on_a_layer_map_naming_a_missing_layer(write_recipe, tmp_path):
    out = tmp_path / "run"
    recipe = write_recipe("- distill: {student: {first: 1}, layer_map: {0: 7}, losses: {hidden: 1.0}}\n")
    proc = slimtune_cli("run", recipe, "--out", out, "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "layer_map" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(out.glob("*distill*"))


def test_finetune_then_distill_end_to_end_reloads_in_slimtune_and_transformers(write_recipe, tmp_path):
    stages = ("- finetune: {epochs: 1}\n"
              "- distill: {student: {layers: [1]}, epochs: 2, cache_teacher: true,\n"
              "            losses: {soft: 1.0, hard: 1.0, hidden: 1.0}, temperature: 2.0}\n")
    result = slimtune.run(write_recipe(stages), out=tmp_path / "run", overrides={"task.limit": 64})
    stage = result.stages[-1]
    metrics = stage.metrics
    assert metrics["student_parameters"] < metrics["teacher_parameters"]
    assert {"accuracy", "best_epoch", "history", "steps"} <= set(metrics) and len(metrics["history"]) == 2
    art = slimtune.load(stage.path)
    record = art.compression["distill"]
    assert record["layers"] == [1] and record["teacher_layers"] == 2 and record["temperature"] == 2.0
    assert record["losses"] == {"soft": 1.0, "hard": 1.0, "hidden": 1.0} and record["layer_map"] == {"0": 1}
    assert [e["stage"] for e in art.lineage] == ["source", "finetune", "distill"]
    plain = AutoModelForSequenceClassification.from_pretrained(stage.path).eval()
    assert plain.config.num_hidden_layers == arch.num_layers(plain) == 1
    batch = Collator(art.tokenizer, 16, "classification")(examples(8))
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                   art.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert not any(k.startswith("projections") for k in art.model.state_dict())

    # a named teacher artifact: the finetuned model, distilled into a fresh run of the source model
    teacher_dir = result.stages[0].path
    named = slimtune.run(write_recipe(f"- distill: {{student: {{first: 1}}, teacher: '{teacher_dir}'}}\n", name="named.yaml"),
                         out=tmp_path / "named", overrides={"task.limit": 32})
    record = slimtune.load(named.stages[-1].path).compression["distill"]
    assert record["teacher"] == str(teacher_dir) and record["layers"] == [0]
    assert named.stages[-1].metrics["teacher_parameters"] == metrics["teacher_parameters"]


def test_embedding_distill_stage_on_unlabelled_text_saves_only_the_student(write_recipe, tmp_path, tiny_bert):
    data = tmp_path / "raw.csv"
    pd.DataFrame({"review": [e["text"] for e in examples(64)]}).to_csv(data, index=False)
    stage = "- distill: {student: {hidden_size: 16, num_heads: 2, num_layers: 1, intermediate_size: 32}, epochs: 1}\n"
    result = slimtune.run(write_recipe(stage, kind="embedding", data=data), out=tmp_path / "run")
    path = result.stages[-1].path
    meta = json.loads((path / "slimtune.json").read_text())
    assert meta["compression"]["distill"]["config"]["hidden_size"] == 16
    assert meta["compression"]["distill"]["losses"] == {"embedding": 1.0}
    plain = AutoModel.from_pretrained(path)
    assert plain.config.hidden_size == 16 and plain.config.num_hidden_layers == 1
    assert result.stages[-1].metrics["steps"] > 0


@pytest.mark.distributed
def test_distill_gives_the_same_student_under_single_ddp_and_fsdp(write_recipe, tmp_path):
    stage = ("- distill: {student: {hidden_size: 16, num_heads: 2, num_layers: 2, intermediate_size: 32}, epochs: 2,\n"
             "            losses: {soft: 1.0, hard: 1.0, hidden: 1.0}, cache_teacher: true}\n")
    report = compare_strategies(write_recipe(stage), tmp_path, overrides={"task.limit": 64, "train.batch_size": 16})
    assert report.ok, str(report)
    assert {("ddp", "distill"), ("fsdp", "distill")} <= set(report.weight_diff)


def test_distill_reads_the_labels_key_of_hugging_face_datasets(tiny_bert):
    """Issue 13: examples as Hugging Face datasets give them (``labels``) used to count as unlabelled."""
    teacher, collate = bert_teacher(tiny_bert)
    spec = {"hidden_size": 16, "num_heads": 2, "num_layers": 1, "intermediate_size": 32}
    hf = [{"text": e["text"], "labels": e["label"]} for e in examples(32)]
    assert collate(hf[:4])["labels"].tolist() == [e["labels"] for e in hf[:4]]
    runs = {}
    for name, data in (("label", examples(32)), ("labels", hf)):
        runs[name] = distill(teacher, spec, data, collate=collate, train=TRAIN, epochs=1, losses={"soft": 1.0, "hard": 1.0})
    assert runs["labels"].distillation.weights.active() == {"soft": 1.0, "hard": 1.0}
    assert runs["labels"].train.history[0]["train_loss"] == runs["label"].train.history[0]["train_loss"]  # same data, same loss
