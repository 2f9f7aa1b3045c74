"""``slimtune``: a thin command line over the Python API.

    slimtune run RECIPE [--set key.path=value ...] [--out DIR] [--fresh]
                 [--nproc N] [--strategy ddp|fsdp|pipeline] [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]
                 [--max-restarts K]
    slimtune plan RECIPE [--nproc N] [--strategy S] [--set k=v ...] [--measure] [--steps K] [--json]
    slimtune eval ARTIFACT_DIR [--split test] [--max-examples N] [--no-latency]
    slimtune latency ARTIFACT_DIR [ARTIFACT_DIR ...]
    slimtune info ARTIFACT_DIR
    slimtune recipes

User errors print one message and exit with 2, as do command-line arguments
out of range (``--max-examples 0``); ``--debug`` also shows the traceback, with
the same exit code. ``--quiet`` turns progress bars and stage logs off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

EXIT_USER_ERROR = 2


def positive_int(text: str) -> int:
    """argparse ``type``: an integer of at least 1 (argparse names the flag and exits with 2 otherwise)."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse ``type``: an integer of at least 0."""
    return _int_at_least(text, 0, "a non-negative integer")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars or stage logs")
    common.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser = argparse.ArgumentParser(prog="slimtune", description="Compress, tune, export and measure pretrained language models by a recipe.", parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", parents=[common], help="run (or resume) a recipe")
    p.add_argument("recipe", help="a YAML file or a shipped recipe name (see `slimtune recipes`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. train.lr=3e-5 or stages.finetune.epochs=2")
    p.add_argument("--out", help="run directory (default runs/<recipe name>)")
    p.add_argument("--fresh", action="store_true", help="recompute every stage, ignoring finished ones")
    g = p.add_argument_group("distributed (torchrun)")
    g.add_argument("--nproc", type=positive_int, help="processes on this machine (sets distributed.nproc; strategy ddp unless the recipe names one)")
    g.add_argument("--strategy", choices=["single", "ddp", "fsdp", "pipeline"], help="sets distributed.strategy")
    g.add_argument("--nnodes", type=positive_int, help="machines taking part (sets distributed.nnodes)")
    g.add_argument("--node-rank", type=non_negative_int, default=0, help="this machine's rank, 0..nnodes-1")
    g.add_argument("--rdzv-endpoint", help="HOST:PORT on machine 0 that every machine can reach")
    g.add_argument("--max-restarts", type=non_negative_int, help="restart all ranks up to N times after one dies; training resumes from its last checkpoint")

    p = sub.add_parser("eval", parents=[common], help="measure an artifact directory")
    p.add_argument("artifact")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=positive_int, default=None, help="evaluate on the first N examples of the split")
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("latency", parents=[common], help="PyTorch latency of artifacts side by side (interleaved), as ratios to the first")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT_DIR")
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.add_argument("--rounds", type=positive_int, default=5, help="round-robin rounds")
    p.add_argument("--runs", type=positive_int, default=20, help="timed calls per artifact and round")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("info", parents=[common], help="show an artifact's lineage, size and compression metadata")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")

    sub.add_parser("recipes", parents=[common], help="list the shipped recipes")

    p = sub.add_parser("plan", parents=[common], help="predict per-device memory and communication of a recipe's training")
    p.add_argument("recipe", help="a YAML file or a shipped recipe name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    p.add_argument("--nproc", type=int, help="processes (sets distributed.nproc; default: the recipe's)")  # checked by plan_command
    p.add_argument("--strategy", help="single, ddp, fsdp or pipeline (default: every strategy; with --measure the recipe's)")
    p.add_argument("--measure", action="store_true", help="train a few steps and print measured beside predicted peak memory")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps to measure (after 2 warm-up steps)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--measure-out", help=argparse.SUPPRESS)  # torchrun ranks of --measure write their measurements here
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure(args.quiet)
    from slimtune.errors import SlimTuneError

    try:
        return COMMANDS[args.command](args)
    except SlimTuneError as err:
        if args.debug:
            traceback.print_exc()
        if _handed_to_launcher(err) or args.debug:
            return getattr(err, "exit_code", EXIT_USER_ERROR)
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  fix: {err.hint}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, re-run to resume", file=sys.stderr)
        return 130


def _handed_to_launcher(err) -> bool:
    """A rank of a launched run reports a user error to the `slimtune run` that started it, which prints it once."""
    if "SLIMTUNE_ERROR_FILE" not in os.environ:
        return False
    from slimtune.distributed.launch import report_user_error

    return report_user_error(err)


def _configure(quiet: bool) -> None:
    from slimtune.progress import set_quiet

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_quiet(quiet)
    other_rank = os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 logs for everyone
    logging.basicConfig(level=logging.WARNING if quiet or other_rank else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_run(args) -> int:
    import slimtune
    from slimtune.recipe import parse_set

    overrides = parse_set(args.overrides)
    overrides.update(_distributed_overrides(args, overrides))
    result = slimtune.run(args.recipe, overrides=overrides, out=args.out, fresh=args.fresh, node_rank=args.node_rank,
                          rdzv_endpoint=args.rdzv_endpoint)
    if os.environ.get("RANK", "0") != "0" or os.environ.get("SLIMTUNE_LAUNCHED") == "1":
        return 0  # rank 0 reports, or the `slimtune run` that launched this one
    from slimtune.eval.report import stage_table, write_summary

    write_summary(result)
    _console().print(stage_table(result.recipe.name, [(r.name, r.path, r.reused, r.metrics) for r in result.stages]))
    print(f"run directory: {result.run_dir}")
    return 0


def _distributed_overrides(args, overrides: dict) -> dict:
    out = {f"distributed.{k}": v for k, v in (("nproc", args.nproc), ("nnodes", args.nnodes), ("max_restarts", args.max_restarts),
                                               ("strategy", args.strategy)) if v is not None}
    if (args.nproc or 1) * (args.nnodes or 1) > 1 and not args.strategy and "distributed.strategy" not in overrides:
        from slimtune.recipe import load_recipe

        if load_recipe(args.recipe).distributed.strategy == "single":
            out["distributed.strategy"] = "ddp"
    return out


def cmd_eval(args) -> int:
    import slimtune
    from slimtune.eval import EvaluateConfig, evaluate_artifact
    from slimtune.eval.report import stage_table

    art = slimtune.load(args.artifact)
    config = EvaluateConfig(split=args.split, max_examples=args.max_examples, latency=not args.no_latency)
    metrics = evaluate_artifact(art, config)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        _console().print(stage_table(str(args.artifact), [("evaluate", Path(args.artifact), False, metrics)]))
    return 0


def cmd_latency(args) -> int:
    import slimtune
    from slimtune.errors import SlimTuneError
    from slimtune.eval.stage import compare_latency

    artifacts = [slimtune.load(a) for a in args.artifacts]
    kinds = {a.task.kind for a in artifacts}
    if len(kinds) > 1 or len({a.task.max_length for a in artifacts}) > 1:
        raise SlimTuneError("the artifacts serve different tasks or input lengths, so their latencies are not comparable",
                            "compare artifacts of one recipe (same task kind and max_length)")
    rows = compare_latency(artifacts, args.batch_size, args.rounds, args.runs)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    from slimtune.eval.report import format_count

    table = Table(title=f"PyTorch latency, batch {args.batch_size}, {args.rounds} x {args.runs} interleaved calls each")
    for col in ("artifact", "parameters", "median ms", "ratio"):
        table.add_column(col, justify="left" if col == "artifact" else "right")
    for r in rows:
        table.add_row(r["artifact"], format_count(r["parameters"]), f"{r['torch_ms']:.2f}", f"{r['ratio']:.3f}")
    _console().print(table)
    return 0


def cmd_info(args) -> int:
    import slimtune
    from slimtune.artifact import read_meta, read_metrics
    from slimtune.eval.report import info_text
    from slimtune.models import parameter_count

    path = Path(args.artifact)
    meta = read_meta(path)
    parameters = parameter_count(slimtune.load(path).model)  # verifies the files; the count `eval` reports
    if args.json:
        print(json.dumps({"meta": meta, "metrics": read_metrics(path), "parameters": parameters}, indent=2))
    else:
        _console().print(info_text(path, meta, read_metrics(path), parameters))
    return 0


def cmd_recipes(args) -> int:
    import yaml
    from rich.table import Table

    from slimtune.recipe import shipped_recipes

    table = Table(title="shipped recipes")
    table.add_column("name")
    table.add_column("description")
    for name, path in sorted(shipped_recipes().items()):
        table.add_row(name, (yaml.safe_load(path.read_text()) or {}).get("description", ""))
    _console().print(table)
    return 0


def cmd_plan(args) -> int:
    from slimtune.distributed.plan import compare_table, plan_command, plan_table

    report = plan_command(args.recipe, args.overrides, nproc=args.nproc, strategy=args.strategy, measure_=args.measure,
                          steps=args.steps, measure_out=args.measure_out)
    if report is None:
        return 0  # a torchrun rank; the launching process reports
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _console().print(compare_table(report) if report.measurements else plan_table(report))
    return 0


def _console():
    from rich.console import Console

    return Console(width=max(160, Console().width))


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "latency": cmd_latency, "info": cmd_info, "recipes": cmd_recipes, "plan": cmd_plan}


if __name__ == "__main__":
    sys.exit(main())
