"""DDP and FSDP2 over 2 CPU processes (gloo) train exactly like one process with the same global batch.

One spawn trains every variant in turn (starting processes is the slow part);
the parent trains the single-process references and compares.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from slimtune.distributed.strategy import DataParallel, FullyShardedDataParallel, SingleDevice
from slimtune.distributed.trainer import Trainer, seed_everything
from slimtune.models import load_pretrained
from slimtune.recipe import TrainConfig
from slimtune.tasks import Classification, Collator

from tests.conftest import tiny_texts

pytestmark = pytest.mark.distributed
CONFIG = dict(batch_size=16, grad_accum=2, lr=2e-3, warmup_ratio=0.0, group_by_length=True)
LEARNS = dict(epochs=8, examples=192, lr=3e-3, grad_accum=1)  # long enough to learn the tiny task
VARIANTS = {  # name: (strategy factory, train() keywords)
    "ddp": (lambda d: DataParallel.from_process_group(d), {}),
    "fsdp": (lambda d: FullyShardedDataParallel.from_process_group(d), {}),
    "fsdp-zero2-offload": (lambda d: FullyShardedDataParallel.from_process_group(d, reshard_after_forward=False, cpu_offload=True), {}),
    "fsdp-checkpointing": (lambda d: FullyShardedDataParallel.from_process_group(d), {"activation_checkpointing": True}),
    "fsdp-bf16": (lambda d: FullyShardedDataParallel.from_process_group(d, param_dtype=torch.bfloat16), {"precision": "bf16", **LEARNS}),
    "ddp-fp16": (lambda d: DataParallel.from_process_group(d), {"precision": "fp16", **LEARNS}),
    "fsdp-fp16": (lambda d: FullyShardedDataParallel.from_process_group(d), {"precision": "fp16", **LEARNS}),
}


WORKER_THREADS = 1  # two processes on a 2-core machine; the references use as many (a matmul's reduction split follows it)
# Weights of a data-parallel run against one process: the same arithmetic except the
# order in which a gradient's K = 16 examples x 16 tokens = 256 terms are summed (two
# half-batches all-reduced, micro-batches accumulated): at most K * u = 256 * 2^-24 =
# 1.5e-5 relative per gradient, doubled by Adam's m / sqrt(v), over T = 8 steps
# (2 epochs of ceil(7 / 2) windows) of at most lr = 2e-3 each: 8 * 2e-3 * 3e-5 = 4.9e-7,
# times 4 for differences fed back through later gradients.
REORDERED_ATOL = 2e-6
# Per-epoch train losses: means of <= 16-term fp32 sums, n * u = 1e-6 relative, losses <= 1.
LOSS_ATOL = 1e-6


def build(model_dir):
    seed_everything(0)
    model, tok = load_pretrained(str(model_dir), "AutoModelForSequenceClassification", num_labels=2)
    return model, Collator(tok, 16, "classification")


def train(model_dir, strategy, epochs=2, examples=100, **extra):
    model, collate = build(model_dir)
    examples = [{"text": t, "label": y} for t, y in tiny_texts(examples)]  # 100 = 6 batches of 16 + one of 4
    trainer = Trainer(model, Classification().loss, TrainConfig(**{**CONFIG, **extra}), strategy, collate)
    result = trainer.fit(examples, epochs=epochs)
    return trainer, result


def worker(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    torch.set_num_threads(WORKER_THREADS)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, (make, extra) in VARIANTS.items():
            strategy = make(torch.device("cpu"))
            trainer, result = train(model_dir, strategy, **extra)
            trainable = strategy.full_state_dict(trainer.model, keep=lambda k: k.startswith("classifier"))
            model = trainer.trained_model()
            if rank == 0:
                save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}.safetensors")
                save_file(trainable, f"{out}/{name}-subset.safetensors")
                save_file({"loss": torch.tensor([r["train_loss"] for r in result.history])}, f"{out}/{name}-loss.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tiny_bert, tmp_path_factory):
    out = tmp_path_factory.mktemp("strategies")
    mp.spawn(worker, args=(2, str(out / "init"), str(tiny_bert), str(out)), nprocs=2, join=True)
    return out


def reference(model_dir, **extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(WORKER_THREADS)
    try:
        trainer, result = train(model_dir, SingleDevice(), **extra)
        return trainer.trained_model().state_dict(), torch.tensor([r["train_loss"] for r in result.history])
    finally:
        torch.set_num_threads(threads)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp-zero2-offload", "fsdp-checkpointing"])
def test_data_parallel_matches_single_process(spawned, tiny_bert, name):
    single, loss = reference(tiny_bert)
    trained = load_file(str(spawned / f"{name}.safetensors"))
    assert max_diff(single, trained) < REORDERED_ATOL, max_diff(single, trained)
    initial = build(tiny_bert)[0].state_dict()
    assert max_diff(single, initial) > 1e-3  # training really changed the weights
    assert torch.allclose(load_file(str(spawned / f"{name}-loss.safetensors"))["loss"].double(), loss.double(), rtol=0, atol=LOSS_ATOL)


def test_fsdp_saves_full_tensors_of_the_model_and_of_a_subset(spawned, tiny_bert):
    trained = load_file(str(spawned / "fsdp.safetensors"))
    model = build(tiny_bert)[0]
    for name, value in model.state_dict().items():
        assert trained[name].shape == value.shape, name  # full, never a local shard
    model.load_state_dict(trained)  # loads as a plain model
    subset = load_file(str(spawned / "fsdp-subset.safetensors"))
    assert set(subset) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(subset[k], trained[k]) for k in subset)


@pytest.mark.parametrize("name,precision", [("fsdp-bf16", "bf16"), ("ddp-fp16", "fp16"), ("fsdp-fp16", "fp16")])
def test_mixed_precision_trains_and_tracks_fp32(spawned, tiny_bert, name, precision):
    _, fp32_loss = reference(tiny_bert, **LEARNS)
    trained = load_file(str(spawned / f"{name}.safetensors"))
    loss = load_file(str(spawned / f"{name}-loss.safetensors"))["loss"]
    assert all(v.dtype == torch.float32 for v in trained.values())  # master weights stay fp32
    assert fp32_loss[-1] < 0.1 and loss[-1] < 0.1, (loss, fp32_loss)  # learned the task, like fp32
    # First-epoch mean loss (~0.7): bf16 rounds each activation to 2^-8 = 3.9e-3 relative
    # (fp16: 2^-11); through the logits that is a few units of it, 0.7 * 3 * 2^-8 = 8e-3.
    assert abs(loss[0] - fp32_loss[0]) < 0.01, (loss, fp32_loss)


def test_activation_checkpointing_gives_the_same_gradients(tiny_bert):
    def gradients(checkpointing: bool) -> dict:
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2, hidden_dropout_prob=0.2)
        if checkpointing:
            from slimtune.distributed.modules import enable_activation_checkpointing

            enable_activation_checkpointing(model)
        model.train()
        _, tok = load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=2)
        batch = Collator(tok, 16, "classification")([{"text": t, "label": y} for t, y in tiny_texts(8)])
        torch.manual_seed(1)  # the same dropout masks, recomputed identically under checkpointing
        loss, _ = Classification().loss(model, batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys() and len(plain) > 10
    # The recomputed forward runs the same kernels on the same inputs with the same masks;
    # only the order autograd adds a parameter's contributions may differ (a few ulps of
    # gradients below 1: 2^-24 each), so 1e-6; a wrong mask would differ by O(gradient).
    assert max_diff(plain, recomputed) < 1e-6
