"""Peak training memory of delta tuning, measured with the project's MemTracker and predicted by the planner.

Issue 14's memory numbers: LoRA on embedded SmolLM2-135M over its fp32 weights against LoRA over INT4
(g128) weights, at the same batch and sequence length, and ladder side-tuning against LoRA on the same
backbone. Each variant builds the model, attaches its delta, runs ``--warmup`` + ``--steps`` optimizer steps
of the causal-LM objective on IMDB training reviews through the Trainer inside ``MemTracker``
(:func:`slimtune.distributed.plan.measure_steps`: tensors only, by category, no allocator or library
overhead) and puts the planner's prediction for the same shape beside it.

Usage:
    python benchmarks/delta_memory.py [--variants fp32-lora,int4-lora,fp32-ladder] [--batch 4] [--seq 256]
           [--checkpointing] [--int4 runs/smollm2-qlora/01-quantize]

``--int4 DIR`` takes the INT4 weights of an artifact (e.g. the GPTQ stage of ``smollm2-qlora``); without
it the blocks are quantized here with round to nearest in the same format (g128, asymmetric): training
memory depends on the format, not on how its codes were chosen.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

MiB = 2**20


def build(variant: str, int4_dir: str | None):
    import slimtune
    from slimtune.compress import quantize_
    from slimtune.delta import add_lora_
    from slimtune.recipe import load_recipe
    from slimtune.distributed.runner import _source_artifact

    weights, method = variant.split("-")
    recipe = load_recipe("smollm2-qlora")
    if weights == "int4" and int4_dir:
        art = slimtune.load(int4_dir)
    else:
        art = _source_artifact(recipe, None)
        if weights == "int4":
            quantize_(art.model, bits=4, group_size=128)
    torch.manual_seed(0)
    if method == "lora":
        add_lora_(art.model, "all-linear", rank=16, alpha=32)
    elif method == "ladder":
        from slimtune.delta import add_ladder_

        add_ladder_(art.model, reduction=8)
        from slimtune.delta import freeze_backbone_

        freeze_backbone_(art.model)
    else:
        raise SystemExit(f"unknown method {method!r}: use lora or ladder")
    return recipe, art


def measure(variant: str, args) -> dict:
    from slimtune.data import load_task_data
    from slimtune.distributed.plan import Setup, _windows, measure_steps, model_shape, predict
    from slimtune.distributed.strategy import SingleDevice
    from slimtune.distributed.trainer import Trainer
    from slimtune.tasks import Collator, task_kind

    recipe, art = build(variant, args.int4)
    cfg = recipe.train.model_copy(update={"batch_size": args.batch, "activation_checkpointing": args.checkpointing,
                                          "group_by_length": False})
    data = load_task_data(recipe.task)
    collate = Collator(art.tokenizer, args.seq, "causal-lm")
    examples = [e for e in data["train"] if len(e["text"]) > 6 * args.seq][: args.batch * (args.warmup + args.steps)]
    strategy = SingleDevice(torch.device("cpu"))
    trainer = Trainer(art.model, task_kind("causal-lm").loss, cfg, strategy, collate)
    started = time.perf_counter()
    measured = measure_steps(trainer, _windows(strategy, examples, collate, cfg, args.warmup + args.steps), args.warmup)
    seconds = (time.perf_counter() - started) / (args.warmup + args.steps)
    shape = model_shape(art.model)
    predicted = predict(shape, Setup("single", 1, args.batch, 1, measured.seq, "fp32", args.checkpointing, "cpu", "causal-lm"))[0]
    return {"variant": variant, "seq": measured.seq, "rows": measured.rows, "measured": measured.memory,
            "predicted": predicted.memory, "trainable": shape.grads, "step_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32-lora,int4-lora")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--int4", default=None, help="artifact directory holding the INT4 weights")
    args = parser.parse_args()
    rows = [measure(v, args) for v in args.variants.split(",")]
    print(f"\nbatch {args.batch} x seq {rows[0]['seq']} (longest padded batch), activation checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| variant | trainable | measured MiB | predicted MiB | meas/pred | parameters+buffers | activations | "
          "gradients | optimizer | temporaries | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, p = r["measured"], r["predicted"]
        total_m, total_p = sum(m.values()), sum(p.values())
        print(f"| {r['variant']} | {r['trainable']:,} | {total_m / MiB:.1f} | {total_p / MiB:.1f} | {total_m / total_p:.2f} | "
              f"{m['parameters'] / MiB:.1f} | {m['activations'] / MiB:.1f} | {m['gradients'] / MiB:.2f} | "
              f"{m['optimizer'] / MiB:.2f} | {m['temporaries'] / MiB:.1f} | {r['step_s']:.1f} |")
    base = sum(rows[0]["measured"].values())
    for r in rows[1:]:
        print(f"{r['variant']} / {rows[0]['variant']}: {sum(r['measured'].values()) / base:.2f} (measured)")


if __name__ == "__main__":
    main()
