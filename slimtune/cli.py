"""``slimtune``: a thin command line over the Python API.

    slimtune run RECIPE [--set key.path=value ...] [--out DIR] [--fresh]
    slimtune eval ARTIFACT_DIR [--split test] [--no-latency]
    slimtune info ARTIFACT_DIR
    slimtune recipes

User errors print one message and exit with 2 (``--debug`` shows the
traceback); ``--quiet`` turns progress bars and stage logs off.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

EXIT_USER_ERROR = 2


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

    p = sub.add_parser("eval", parents=[common], help="measure an artifact directory")
    p.add_argument("artifact")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--no-latency", action="store_true", help="skip the latency measurements")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")

    p = sub.add_parser("info", parents=[common], help="show an artifact's lineage, size and compression metadata")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true")

    sub.add_parser("recipes", parents=[common], help="list the shipped recipes")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure(args.quiet)
    from slimtune.errors import SlimTuneError

    try:
        return COMMANDS[args.command](args)
    except SlimTuneError as err:
        if args.debug:
            raise
        print(f"error: {err.message}", file=sys.stderr)
        if err.hint:
            print(f"  fix: {err.hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted; finished stages are kept, re-run to resume", file=sys.stderr)
        return 130


def _configure(quiet: bool) -> None:
    from slimtune.progress import set_quiet

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_quiet(quiet)
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    for noisy in ("torch.onnx", "onnxscript", "onnx_ir", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def cmd_run(args) -> int:
    import slimtune
    from slimtune.recipe import parse_set

    result = slimtune.run(args.recipe, overrides=parse_set(args.overrides), out=args.out, fresh=args.fresh)
    from slimtune.eval.report import stage_table, write_summary

    write_summary(result)
    _console().print(stage_table(result.recipe.name, [(r.name, r.path, r.reused, r.metrics) for r in result.stages]))
    print(f"run directory: {result.run_dir}")
    return 0


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


def cmd_info(args) -> int:
    from slimtune.artifact import read_meta, read_metrics
    from slimtune.eval.report import info_text

    path = Path(args.artifact)
    meta = read_meta(path)
    if args.json:
        print(json.dumps({"meta": meta, "metrics": read_metrics(path)}, indent=2))
    else:
        _console().print(info_text(path, meta, read_metrics(path)))
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


def _console():
    from rich.console import Console

    return Console(width=max(160, Console().width))


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "info": cmd_info, "recipes": cmd_recipes}


if __name__ == "__main__":
    sys.exit(main())
