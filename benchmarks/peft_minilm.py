"""The peer of `slimtune run minilm-lora`: PEFT's own LoRA on the same model, split, batches and Trainer.

PEFT (peft.get_peft_model, task_type SEQ_CLS, so the classifier trains too) wraps the embedded MiniLM
loaded exactly as SlimTune's runner loads it (same seed, same new head); SlimTune's Trainer trains it on
the same examples in the same order (the recipe's train config) and the task's own evaluation measures
test accuracy, so only the LoRA implementation differs. Prints one JSON line.

Usage: python benchmarks/peft_minilm.py [--rank 4] [--targets all-linear] [--lr 2e-3] [--recipe minilm-lora]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default="minilm-lora")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8)
    parser.add_argument("--targets", default="all-linear", help="all-linear, or a comma list such as query,value")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    import peft
    import torch

    from slimtune.data import load_task_data
    from slimtune.distributed.runner import _source_artifact
    from slimtune.distributed.strategy import SingleDevice
    from slimtune.distributed.trainer import Trainer
    from slimtune.recipe import load_recipe
    from slimtune.stage import iterate_batches
    from slimtune.tasks import Collator, task_kind

    recipe = load_recipe(args.recipe)
    data = load_task_data(recipe.task)
    art = _source_artifact(recipe, data.labels)
    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=targets)
    torch.manual_seed(recipe.train.seed)
    model = peft.get_peft_model(art.model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in art.model.parameters())  # distinct parameters, as SlimTune's percentage counts them
    kind = task_kind(recipe.task.kind)
    collate = Collator(art.tokenizer, recipe.task.max_length, recipe.task.kind)
    trainer = Trainer(model, kind.loss, recipe.train, SingleDevice(torch.device("cpu")), collate)
    started = time.perf_counter()
    result = trainer.fit(data["train"], 1, lr=args.lr)
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        metrics = kind.evaluate(model, iterate_batches(data["test"], collate, recipe.train.eval_batch_size))
    print(json.dumps({"peft": peft.__version__, "rank": args.rank, "targets": args.targets, "lr": args.lr,
                      "test_accuracy": metrics["accuracy"], "trainable": trainable,
                      "trainable_percent": 100 * trainable / total, "train_seconds": round(seconds, 1),
                      "step_seconds": result.step_seconds,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


if __name__ == "__main__":
    main()
