"""A 2-stage pipeline over 2 CPU processes (gloo) trains exactly like one process with the same global batch.

One spawn trains every variant in turn (starting processes is the slow part);
the parent trains the single-process references and compares. 99 examples
make 6 batches of 16 and one of 3 rows, which cannot be cut into 2 or 4
equal micro-batches (fewer chunks; GPipe where 1F1B would lack one per stage).
"""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer, LlamaForCausalLM

from slimtune.distributed.pipeline import Pipeline, chunk_count, parameter_owners, split_blocks
from slimtune.distributed.strategy import SingleDevice
from slimtune.distributed.modules import transformer_blocks
from slimtune.distributed.trainer import Trainer, seed_everything
from slimtune.errors import SlimTuneError
from slimtune.models import load_pretrained
from slimtune.recipe import TrainConfig
from slimtune.tasks import CausalLM, Classification, Collator

from tests.conftest import tiny_texts

pytestmark = pytest.mark.distributed
CONFIG = dict(batch_size=16, grad_accum=2, lr=2e-3, warmup_ratio=0.0, group_by_length=True)
VARIANTS = {  # name: (model, schedule, microbatches, train() keywords)
    "bert-gpipe": ("bert", "gpipe", 2, {"best_first": True}),
    "bert-1f1b": ("bert", "1f1b", 2, {"checkpoint_every": 3}),
    "bert-1f1b-checkpointing": ("bert", "1f1b", 4, {"activation_checkpointing": True}),
    "llama-1f1b": ("llama", "1f1b", 4, {"checkpoint_every": 3}),
    # Whole batches, so the same fp16 overflows and bf16 roundings as one process.
    "bert-fp16": ("bert", "gpipe", 1, {"precision": "fp16"}),
    "bert-bf16-checkpointing": ("bert", "gpipe", 1, {"precision": "bf16", "activation_checkpointing": True}),
}
HISTORY = ("train_loss", "accuracy", "perplexity")
WORKER_THREADS = 1  # two processes on few cores: more threads only contend; the references use as many


def in_subset(key: str) -> bool:
    return key.startswith("classifier") or ".layer.0." in key  # owned by stage 1, by stage 0


def build(model_dir, kind: str):
    """(model, collate, task, examples); the Llama with its input embedding tied to the LM head."""
    seed_everything(0)
    if kind == "bert":
        model, tok = load_pretrained(str(model_dir), "AutoModelForSequenceClassification", num_labels=2)
        return model, Collator(tok, 16, "classification"), Classification(), [{"text": t, "label": y} for t, y in tiny_texts(99)]
    model, tok = LlamaForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    model.lm_head.weight = model.model.embed_tokens.weight  # the fixture is untied; tie it
    model.config.tie_word_embeddings = True
    return model, Collator(tok, 16, "causal-lm"), CausalLM(), [{"text": t} for t, _ in tiny_texts(99)]


def train(model_dir, kind, strategy, checkpoint_dir=None, best_first=False, **extra):
    """Fit 2 epochs, evaluating after each (on every rank); ``best_first`` makes epoch 1 the best, restored at the end."""
    model, collate, task, examples = build(model_dir, kind)
    held_out = [collate(examples[:32])]
    scores = iter([0.9, 0.5])

    def eval_fn(m):
        return {**task.evaluate(m, held_out), **({"score": next(scores)} if best_first else {})}

    trainer = Trainer(model, task.loss, TrainConfig(**{**CONFIG, **extra}), strategy, collate, eval_fn,
                      metric="score" if best_first else None, checkpoint_dir=checkpoint_dir)
    return trainer, trainer.fit(examples, epochs=2)


def history(result) -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in result.history], dtype=torch.float64) for k in HISTORY if k in result.history[0]}


def save(trainer, result, path: str | None) -> None:
    """Write the finalized model and the history (finalize is collective: call on every rank, path=None to skip)."""
    model = trainer.trained_model()
    if path is None:
        return
    save_file({k: v.clone() for k, v in model.state_dict().items()}, path)  # clones: tied tensors share memory
    save_file(history(result), path + ".history")


def check_scaler(strategy, rank: int, out: str) -> None:
    """An inf gradient on one stage only makes every stage skip the step and back off."""
    scaler = strategy.grad_scaler(True)
    p = nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([p], lr=1.0)
    scaler.scale(p.sum()).backward()
    if rank == 1:
        p.grad[0] = float("inf")
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    save_file({"p": p.detach(), "scale": torch.tensor([scaler.get_scale()])}, f"{out}/scaler-{rank}.safetensors")


def worker(rank: int, world: int, init_file: str, dirs: dict, out: str) -> None:
    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cpu = torch.device("cpu")
        for name, (kind, schedule, microbatches, extra) in VARIANTS.items():
            strategy = Pipeline.from_process_group(cpu, schedule=schedule, microbatches=microbatches)
            checkpoints = f"{out}/checkpoints-{name}" if "checkpoint_every" in extra else None
            trainer, result = train(dirs[kind], kind, strategy, checkpoint_dir=checkpoints, **extra)
            if name == "bert-1f1b":
                save_file(strategy.full_state_dict(trainer.model, keep=in_subset), f"{out}/subset-{rank}.safetensors")
                save(trainer, result, f"{out}/{name}-{rank}.safetensors")  # finalize: the full model on every rank
            else:
                save(trainer, result, f"{out}/{name}.safetensors" if rank == 0 else None)
            if checkpoints:  # a fresh run in the same directory resumes from the last checkpoint (step 6 of 8, mid-epoch)
                strategy = Pipeline.from_process_group(cpu, schedule=schedule, microbatches=microbatches)
                trainer, result = train(dirs[kind], kind, strategy, checkpoint_dir=checkpoints, **extra)
                assert result.resumed_from == 6, result.resumed_from
                save(trainer, result, f"{out}/{name}-resumed.safetensors" if rank == 0 else None)
        check_scaler(strategy, rank, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tiny_bert, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    dirs = {"bert": str(tiny_bert), "llama": str(tiny_llama)}
    mp.spawn(worker, args=(2, str(out / "init"), dirs, str(out)), nprocs=2, join=True)
    return out


@functools.cache
def reference(model_dir, kind, precision="fp32", best_first=False):
    """The single-process run (state, history); shared by the tests that compare against it.

    On one thread, like the workers: oneDNN and MKL split a matmul's
    reduction by thread count, so another count rounds differently (in bf16
    by up to 2^-8 relative) and the comparison would test the CPU, not the pipeline.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        trainer, result = train(model_dir, kind, SingleDevice(), precision=precision, best_first=best_first)
        return trainer.trained_model().state_dict(), history(result)
    finally:
        torch.set_num_threads(threads)


# Bound on fp32 weight differences when both runs do the same arithmetic except
# the order of summation (micro-batches accumulate gradients in another order
# than one whole-batch backward). A gradient component is a sum of K = 16
# examples x 16 tokens = 256 terms, so reordering changes it by at most about
# K * u = 256 * 2^-24 = 1.5e-5 relative; Adam's m / sqrt(v) can double a
# relative change; each of the T = 8 steps (2 epochs of ceil(7 / 2) windows)
# moves a weight by at most lr = 2e-3, so the first-order bound is
# T * lr * 2 * K * u = 8 * 2e-3 * 3e-5 = 4.9e-7; a factor 4 covers the
# differences fed back through later gradients. (A gradient at the level of
# its own rounding noise would take an O(lr) different Adam step; the tiny
# model's gradients are not near zero, except exactly zero rows, which are
# zero on both sides.)
REORDERED_ATOL = 2e-6
# Losses and metrics: an fp32 mean over n <= 16 examples summed in another
# order differs by at most n * u = 16 * 2^-24 = 1e-6 relative; used as rtol
# and atol (perplexities are ~1e2, losses ~1).
HISTORY_TOL = 1e-6


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def trained(spawned, name: str) -> tuple[dict, dict]:
    path = spawned / (f"{name}-0.safetensors" if name == "bert-1f1b" else f"{name}.safetensors")
    return load_file(str(path)), load_file(f"{path}.history")


def close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=atol, atol=atol) for k in a)


@pytest.mark.parametrize("name", ["bert-gpipe", "bert-1f1b", "bert-1f1b-checkpointing", "llama-1f1b"])
def test_pipeline_matches_single_process(spawned, tiny_bert, tiny_llama, name):
    kind, _, _, extra = VARIANTS[name]
    model_dir = tiny_bert if kind == "bert" else tiny_llama
    single, single_history = reference(model_dir, kind, best_first=extra.get("best_first", False))
    state, pipeline_history = trained(spawned, name)
    assert max_diff(single, state) < REORDERED_ATOL, max_diff(single, state)
    assert max_diff(single, build(model_dir, kind)[0].state_dict()) > 1e-3  # training really changed the weights
    assert close(pipeline_history, single_history, atol=HISTORY_TOL), (pipeline_history, single_history)  # losses, evaluations


def test_best_epoch_is_restored(spawned, tiny_bert):
    last_epoch, _ = trained(spawned, "bert-1f1b")  # the same training without a metric: the last epoch's weights
    best, _ = trained(spawned, "bert-gpipe")
    assert max_diff(best, last_epoch) > 1e-4


def test_tied_embedding_stays_tied_and_trained_on_both_stages(spawned, tiny_llama):
    state, _ = trained(spawned, "llama-1f1b")
    initial = build(tiny_llama, "llama")[0].state_dict()
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    assert (state["lm_head.weight"] - initial["lm_head.weight"]).abs().max() > 1e-3


def test_finalize_and_full_state_dict_give_full_tensors_on_every_rank(spawned, tiny_bert):
    ranks = [load_file(str(spawned / f"bert-1f1b-{r}.safetensors")) for r in (0, 1)]
    assert max_diff(ranks[0], ranks[1]) == 0.0
    model = build(tiny_bert, "bert")[0]
    for name, value in model.state_dict().items():
        assert ranks[0][name].shape == value.shape, name
    model.load_state_dict(ranks[0])  # loads as a plain model
    for rank in (0, 1):
        subset = load_file(str(spawned / f"subset-{rank}.safetensors"))
        assert {k.split(".")[0] for k in subset} == {"classifier", "bert"} and all(in_subset(k) for k in subset)
        assert all(torch.equal(subset[k], ranks[0][k]) for k in subset)


@pytest.mark.parametrize("name", ["bert-1f1b", "llama-1f1b"])
def test_resume_from_a_checkpoint_continues_exactly(spawned, name):
    uninterrupted, uninterrupted_history = trained(spawned, name)
    resumed, resumed_history = trained(spawned, f"{name}-resumed")
    # The same processes, schedule and micro-batches from an exact fp32 state: nothing may differ.
    assert max_diff(uninterrupted, resumed) == 0.0, max_diff(uninterrupted, resumed)
    assert close(uninterrupted_history, resumed_history, atol=0.0)


@pytest.mark.parametrize("name,precision", [("bert-fp16", "fp16"), ("bert-bf16-checkpointing", "bf16")])
def test_mixed_precision_matches_single_process(spawned, tiny_bert, name, precision):
    single, single_history = reference(tiny_bert, "bert", precision=precision)
    state, pipeline_history = trained(spawned, name)
    assert all(v.dtype == torch.float32 for v in state.values())  # master weights stay fp32
    # Whole batches (one micro-batch), the same thread count, and a stage boundary that passes
    # the fp32 activations and gradients one process has there: the two runs do the same
    # arithmetic, so the weights are bitwise equal. Any bound would be loose: a bf16 rounding
    # (2^-8 relative) of a near-zero gradient turns into a full lr-sized Adam step.
    assert max_diff(single, state) == 0.0, max_diff(single, state)
    # The reported loss is averaged per chunk then over ranks (n <= 16 terms): HISTORY_TOL.
    assert close(pipeline_history, single_history, atol=HISTORY_TOL), (pipeline_history, single_history)


def test_found_inf_on_one_stage_skips_the_step_on_all(spawned):
    for rank in (0, 1):
        result = load_file(str(spawned / f"scaler-{rank}.safetensors"))
        assert torch.equal(result["p"], torch.ones(3)), rank  # no rank stepped
        assert result["scale"].item() == 2.0**15, rank  # every rank backed off


def test_blocks_split_into_near_equal_ranges_and_batches_into_equal_chunks():
    assert split_blocks(2, 2) == [range(0, 1), range(1, 2)]
    assert split_blocks(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(SlimTuneError, match="fewer than the 3 pipeline stages"):
        split_blocks(2, 3)
    assert [chunk_count(rows, 4) for rows in (16, 6, 3, 7, 1)] == [4, 3, 3, 1, 1]


def test_owners_follow_registration_order_and_tied_parameters_have_both(tiny_llama):
    model = build(tiny_llama, "llama")[0]
    blocks = transformer_blocks(model)
    owners = parameter_owners(model, blocks, split_blocks(len(blocks), 2))
    assert owners["model.layers.0.mlp.up_proj.weight"] == {0} and owners["model.layers.1.mlp.up_proj.weight"] == {1}
    assert owners["model.norm.weight"] == {1}
    assert owners["model.embed_tokens.weight"] == owners["lm_head.weight"] == {0, 1}  # tied


def test_1f1b_needs_a_microbatch_per_stage():
    with pytest.raises(SlimTuneError, match="microbatches"):
        Pipeline(torch.device("cpu"), rank=0, world_size=4, schedule="1f1b", microbatches=2)
    Pipeline(torch.device("cpu"), rank=0, world_size=4, schedule="gpipe", microbatches=2)
