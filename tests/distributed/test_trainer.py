import copy

import torch

from slimtune.distributed.strategy import SingleDevice
from slimtune.distributed.trainer import Trainer, seed_everything
from slimtune.models import load_pretrained
from slimtune.recipe import TrainConfig
from slimtune.tasks import Classification, Collator

from tests.conftest import tiny_texts


def setup(tiny_bert, **train):
    seed_everything(0)  # the new classification head
    model, tok = load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=2)
    examples = [{"text": t, "label": y} for t, y in tiny_texts(192)]
    config = TrainConfig(**{"batch_size": 16, "lr": 2e-3, "warmup_ratio": 0.0, **train})
    return model, Collator(tok, 16, "classification"), examples, config


def test_loss_falls_and_accuracy_rises(tiny_bert):
    model, collate, examples, config = setup(tiny_bert)
    kind = Classification()
    batches = [collate(examples[i:i + 64]) for i in range(0, 192, 64)]
    before = kind.evaluate(model.eval(), batches)["accuracy"]
    trainer = Trainer(model, kind.loss, config, SingleDevice(), collate, lambda m: kind.evaluate(m, batches), "accuracy")
    result = trainer.fit(examples, epochs=8)
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.best["accuracy"] > max(before, 0.85)
    assert not trainer.model.training


def test_grad_accumulation_matches_the_larger_batch(tiny_bert):
    model, collate, examples, _ = setup(tiny_bert)
    kind = Classification()
    examples = examples[:40]  # 40 = 16 + 16 + 8: an uneven last micro-batch
    runs = {}
    for name, batch, accum in (("big", 40, 1), ("accum", 16, 3)):
        config = TrainConfig(batch_size=batch, grad_accum=accum, lr=1e-3, warmup_ratio=0.0, max_grad_norm=None)
        m = copy.deepcopy(model)
        Trainer(m, kind.loss, config, SingleDevice(), collate).fit(examples, epochs=1)
        runs[name] = m.state_dict()
    # One Adam step: m / sqrt(v) = g / |g| is insensitive to the K u = 640 * 2^-24 = 4e-5 relative
    # difference of gradients summed in another order (40 examples x 16 tokens); what is left
    # is weight decay and rounding of w - lr * step (|w| * 2^-24): atol 1e-6 plus the default rtol.
    assert all(torch.allclose(runs["big"][k], runs["accum"][k], atol=1e-6) for k in runs["big"])
    assert not all(torch.equal(model.state_dict()[k], runs["big"][k]) for k in runs["big"])


def test_best_epoch_is_restored(tiny_bert):
    model, collate, examples, config = setup(tiny_bert)
    kind = Classification()
    scores = iter([0.9, 0.5, 0.7])
    snapshots = []

    def eval_fn(m):
        snapshots.append(copy.deepcopy(m.state_dict()))
        return {"accuracy": next(scores)}

    result = Trainer(model, kind.loss, config, SingleDevice(), collate, eval_fn, "accuracy").fit(examples, epochs=3)
    assert result.best_epoch == 1
    assert all(torch.equal(v, snapshots[0][k]) for k, v in model.state_dict().items())


def test_bf16_autocast_trains_and_is_seeded(tiny_bert):
    finals = []
    for _ in range(2):
        model, collate, examples, config = setup(tiny_bert, precision="bf16")
        result = Trainer(model, Classification().loss, config, SingleDevice(), collate).fit(examples, epochs=8)
        finals.append(result.history[-1]["train_loss"])
        assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert finals[0] == finals[1]


def test_max_steps_stops_early(tiny_bert):
    model, collate, examples, config = setup(tiny_bert)
    result = Trainer(model, Classification().loss, config, SingleDevice(), collate).fit(examples, epochs=5, max_steps=3)
    assert result.steps == 3


def test_length_grouped_batches_cover_every_example_once_with_less_padding():
    from slimtune.distributed.strategy import length_grouped_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (1003,), generator=g).tolist()
    epoch1, epoch2 = length_grouped_batches(lengths, 16, seed=3), length_grouped_batches(lengths, 16, seed=4)
    for batches in (epoch1, epoch2):
        assert sorted(i for b in batches for i in b) == list(range(1003)) and len(batches) == 63
    assert epoch1 != epoch2  # reshuffled each epoch
    assert length_grouped_batches(lengths, 16, seed=3) == epoch1  # seeded
    padded = sum(max(lengths[i] for i in b) * len(b) for b in epoch1)
    random_batches = torch.randperm(1003, generator=g).split(16)
    padded_random = sum(max(lengths[i] for i in b.tolist()) * len(b) for b in random_batches)
    assert padded < 0.7 * padded_random
