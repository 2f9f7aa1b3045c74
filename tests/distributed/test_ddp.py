"""DDP over 2 CPU processes (gloo) trains exactly like one process with the same global batch."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from slimtune.distributed.strategy import DataParallel, SingleDevice
from slimtune.distributed.trainer import Trainer, seed_everything
from slimtune.models import load_pretrained
from slimtune.recipe import TrainConfig
from slimtune.tasks import Classification, Collator

from tests.conftest import tiny_texts

pytestmark = pytest.mark.distributed
CONFIG = dict(batch_size=16, grad_accum=2, lr=2e-3, warmup_ratio=0.0, group_by_length=True)


def train(model_dir, strategy) -> dict:
    seed_everything(0)
    model, tok = load_pretrained(str(model_dir), "AutoModelForSequenceClassification", num_labels=2)
    examples = [{"text": t, "label": y} for t, y in tiny_texts(100)]  # 100 = 6 batches of 16 + one of 4
    trainer = Trainer(model, Classification().loss, TrainConfig(**CONFIG), strategy, Collator(tok, 16, "classification"))
    result = trainer.fit(examples, epochs=2)
    state = {k: v.contiguous() for k, v in strategy.unwrap(trainer.model).state_dict().items()}
    return state, result


def worker(rank: int, world: int, init_file: str, model_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state, result = train(model_dir, DataParallel.from_process_group(torch.device("cpu")))
        if rank == 0:
            save_file(state, out)
            save_file({"loss": torch.tensor([r["train_loss"] for r in result.history])}, out + ".loss")
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tiny_bert, tmp_path):
    out = str(tmp_path / "ddp.safetensors")
    mp.spawn(worker, args=(2, str(tmp_path / "init"), str(tiny_bert), out), nprocs=2, join=True)
    single, result = train(tiny_bert, SingleDevice())
    ddp = load_file(out)
    assert single.keys() == ddp.keys()
    worst = max((single[k] - ddp[k]).abs().max().item() for k in single)
    assert worst < 1e-5, worst
    moved = max((single[k] - load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=2)[0].state_dict()[k]).abs().max().item()
                for k in single if not k.startswith("classifier"))
    assert moved > 1e-3  # training really changed the weights
    ddp_loss = load_file(out + ".loss")["loss"]
    assert torch.allclose(ddp_loss, torch.tensor([r["train_loss"] for r in result.history], dtype=ddp_loss.dtype), atol=1e-5)
