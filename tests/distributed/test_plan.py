"""`slimtune plan`: memory and communication predictions, checked against what PyTorch saves and what MemTracker measures."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from slimtune.cli import main
from slimtune.distributed.plan import Compute, block_activations, model_shape, plan_command

TINY = "- finetune: {epochs: 1}\n"


def saved_bytes(model, ids, mask, precision: str) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward (the reference)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
        model(input_ids=ids, attention_mask=mask)
    return sum(seen.values())


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_activations_are_what_autograd_saves_per_block(dropout, attention, precision):
    ids = torch.randint(5, 50, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding: sdpa saves the mask as a bias
    saved = []
    for layers in (1, 2):  # the difference is one block
        config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation=attention)
        model = BertForSequenceClassification(config).train()
        saved.append(saved_bytes(model, ids, mask, precision))
    block = model.bert.encoder.layer[0]
    # autocast's 16-bit weight copies are counted separately by the plan (they are per weight, not per token)
    copies = 2 * sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear)) if precision == "bf16" else 0
    shape = model_shape(model)
    assert saved[1] - saved[0] - copies == block_activations(shape, 3, 12, Compute.of(shape, precision, "cpu"))


@pytest.fixture
def tiny_plan(write_recipe):
    """plan(strategy, world, *sets) -> the predictions for the tiny recipe."""
    path = write_recipe(TINY)

    def run(strategy, world=1, *sets):
        return plan_command(str(path), list(sets), nproc=world, strategy=strategy).predictions

    return run


def test_fsdp_keeps_one_nth_of_the_parameters_gradients_and_optimizer_state(tiny_plan):
    single = tiny_plan("single")[0].phases["optimizer step"]
    buffers = single["parameters"] - single["gradients"]  # not sharded
    for world in (2, 4):
        sharded = tiny_plan("fsdp", world)[0].phases["optimizer step"]
        assert sharded["parameters"] - buffers == pytest.approx((single["parameters"] - buffers) / world, rel=1e-3)
        for category in ("gradients", "optimizer"):
            assert sharded[category] == pytest.approx(single[category] / world, rel=1e-3), category


def test_activation_checkpointing_lowers_activations(tiny_plan):
    plain = tiny_plan("single", 1, "task.max_length=64")[0].phases["backward, last block"]
    checkpointed = tiny_plan("single", 1, "task.max_length=64", "train.activation_checkpointing=true")[0].phases["backward, last block"]
    assert checkpointed["activations"] < 0.8 * plain["activations"]
    assert checkpointed["parameters"] == plain["parameters"]


def test_ddp_sends_a_ring_all_reduce_of_the_gradients_once_per_step(tiny_plan):
    single = tiny_plan("single")[0]
    grads = single.phases["optimizer step"]["gradients"]
    assert single.comm == 0
    for world in (2, 4):
        for accum in (1, 3):
            ddp = tiny_plan("ddp", world, f"train.grad_accum={accum}")[0]
            assert ddp.comm == pytest.approx(2 * (world - 1) / world * grads, rel=1e-6)  # accumulation runs under no_sync
            assert ddp.memory["comm buffers"] == grads  # DDP's buckets hold a copy of every gradient
    zero3, zero2 = tiny_plan("fsdp", 2)[0], tiny_plan("fsdp", 2, "distributed.fsdp.reshard_after_forward=false")[0]
    assert zero3.comm == pytest.approx(3 / 2 * zero2.comm, rel=1e-6)  # all-gather twice + reduce-scatter, vs once + once


def test_pipeline_ranks_hold_their_share_of_the_model(tiny_plan):
    single = tiny_plan("single")[0].phases["optimizer step"]["parameters"]
    stages = tiny_plan("pipeline", 2)
    assert [p.rank for p in stages] == [0, 1]
    held = sum(p.phases["optimizer step"]["parameters"] for p in stages)
    assert held == pytest.approx(single, rel=0.05)
    assert stages[0].memory["activations"] > stages[1].memory["activations"]  # 1F1B: stage 0 keeps more micro-batches


@pytest.mark.parametrize("args,message", [
    (["--strategy", "zero"], "unknown strategy 'zero'"),
    (["--nproc", "0"], "--nproc 0 must be at least 1"),
    (["--nproc", "3", "--strategy", "pipeline"], "a pipeline of 3 stages needs at least 3 blocks"),
])
def test_bad_input_is_a_user_error(write_recipe, capsys, args, message):
    assert main(["plan", str(write_recipe(TINY)), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err


def test_plan_prints_every_strategy(write_recipe, capsys):
    assert main(["plan", str(write_recipe(TINY)), "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("single x1", "ddp x2", "fsdp ZeRO-3 x2", "fsdp ZeRO-2 x2", "pipeline 1f1b"):
        assert row in out


def within(report: dict, tolerance: float = 0.25) -> None:
    """Every rank's measured total within ``tolerance`` of its prediction."""
    ratios = [m["total"] / p["total"] for p, m in zip(report["predictions"], report["measurements"])]
    assert ratios and all(abs(r - 1) <= tolerance for r in ratios), ratios


def test_measure_in_one_process_prints_measured_beside_predicted(write_recipe, capsys):
    assert main(["plan", str(write_recipe(TINY)), "--measure", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "predicted vs measured" in out and "meas/pred" in out
    rows = {cells[1].strip(): [c.strip() for c in cells[2:-1]] for cells in (line.split("│") for line in out.splitlines())
            if len(cells) == 6}
    assert set(rows) >= {"parameters", "gradients", "optimizer", "activations", "temporaries", "total"}
    predicted, measured, ratio = (float(cell.replace(",", "")) for cell in rows["total"])
    assert predicted > 0 and measured > 0 and abs(ratio - 1) <= 0.25
    assert rows["optimizer"][0] == rows["optimizer"][1]  # AdamW's state is exact


@pytest.mark.distributed
def test_measure_under_torchrun_with_two_fsdp_processes(write_recipe):
    proc = subprocess.run([sys.executable, "-m", "slimtune", "plan", str(write_recipe(TINY)), "--measure", "--nproc", "2",
                           "--strategy", "fsdp", "--steps", "2", "--json", "--quiet"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert [m["rank"] for m in report["measurements"]] == [0, 1]
    assert report["predictions"][0]["strategy"] == "fsdp ZeRO-3"
    within(report)


def test_a_delta_on_a_frozen_backbone_makes_only_its_own_gradients_and_optimizer_state(tiny_bert, tiny_csv):
    """model_shape of a LoRA'd model: gradients and AdamW state for the delta alone, exact against MemTracker."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from slimtune.delta import add_lora_
    from slimtune.distributed.plan import Setup, _windows, measure_steps, predict
    from slimtune.distributed.strategy import SingleDevice
    from slimtune.distributed.trainer import Trainer
    from slimtune.recipe import TrainConfig
    from slimtune.tasks import Collator, task_kind

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2)
    add_lora_(model, "all-linear", rank=4, train=["classifier.*"])
    shape = model_shape(model)
    delta = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert shape.grads == delta < shape.params
    cfg = TrainConfig(batch_size=8, lr=1e-3, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    collate = Collator(tokenizer, 16, "classification")
    examples = [{"text": f"a good film number {i}", "label": i % 2} for i in range(64)]
    strategy = SingleDevice(torch.device("cpu"))
    trainer = Trainer(model, task_kind("classification").loss, cfg, strategy, collate)
    measured = measure_steps(trainer, _windows(strategy, examples, collate, cfg, 4), warmup=2)
    predicted = predict(shape, Setup("single", 1, 8, 1, measured.seq, "fp32", False, "cpu", "classification",
                                     True, False, "1f1b", 1))[0]
    assert predicted.memory["optimizer"] == measured.memory["optimizer"]  # AdamW's two fp32 states per trained element
    step = predict(shape, Setup("single", 1, 8, 1, measured.seq, "fp32", False, "cpu", "classification"))[0]
    assert step.phases["optimizer step"]["gradients"] == delta * 4  # every delta gradient, nothing of the backbone
    assert measured.memory["gradients"] <= delta * 4
    assert abs(measured.total / predicted.total - 1) <= 0.25  # the whole step, as the finetune check bounds it
