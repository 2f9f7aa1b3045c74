"""Command-line arguments are validated like recipe keys (message, exit 2), also under ``--debug``; ``info`` and
``eval`` count parameters the same way."""

import json

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from slimtune.artifact import Artifact
from slimtune.cli import build_parser, main
from slimtune.compress import quantize_
from slimtune.compress.quant.stage import module_swaps
from slimtune.recipe import TaskConfig
from tests.slimtune.test_cli import slimtune_cli

POSITIVE = [
    (["eval", "a"], "--max-examples"),
    (["latency", "a"], "--batch-size"),
    (["latency", "a"], "--rounds"),
    (["latency", "a"], "--runs"),
    (["run", "r"], "--nproc"),
    (["run", "r"], "--nnodes"),
]
NON_NEGATIVE = [(["run", "r"], "--node-rank"), (["run", "r"], "--max-restarts")]


def parse_error(capsys, argv: list[str]) -> str:
    """The stderr of an argument the parser refuses; fails unless it exits with 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("command, flag", POSITIVE)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_positive_integer_options_refuse_zero_and_negatives(capsys, command, flag, value):
    err = parse_error(capsys, [*command, flag, value])
    assert f"argument {flag}: must be a positive integer, got {value}" in err


@pytest.mark.parametrize("command, flag", NON_NEGATIVE)
def test_non_negative_options_refuse_negatives_and_take_zero(capsys, command, flag):
    err = parse_error(capsys, [*command, flag, "-1"])
    assert f"argument {flag}: must be a non-negative integer, got -1" in err
    assert getattr(build_parser().parse_args([*command, flag, "0"]), flag[2:].replace("-", "_")) == 0


@pytest.mark.parametrize("command, flag", POSITIVE + NON_NEGATIVE)
def test_integer_options_refuse_non_integers_and_take_integers(capsys, command, flag):
    err = parse_error(capsys, [*command, flag, "2.5"])
    assert f"argument {flag}: must be a " in err and "got '2.5'" in err
    assert getattr(build_parser().parse_args([*command, flag, "3"]), flag[2:].replace("-", "_")) == 3


@pytest.mark.parametrize("flag", ["--nproc", "--steps"])
def test_plan_refuses_counts_below_one_naming_the_flag(capsys, flag):
    assert main(["plan", "no-such-recipe.yaml", flag, "0"]) == 2  # plan_command checks them, before reading the recipe
    err = capsys.readouterr().err
    assert f"{flag} 0 must be at least 1" in err and "fix:" in err and "Traceback" not in err


def test_debug_shows_the_traceback_and_keeps_the_exit_code_of_a_user_error(capsys, tmp_path):
    assert main(["eval", str(tmp_path), "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ArtifactError" in err and "not a SlimTune artifact" in err


def test_debug_process_exits_with_2_on_a_user_error(tmp_path):
    proc = slimtune_cli("info", tmp_path, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "not a SlimTune artifact" in proc.stderr


@pytest.fixture(scope="module")
def quantized_artifact(tmp_path_factory, tiny_bert, tiny_csv):
    """The tiny BERT classifier with its linears quantized to 4 bits, saved; and its float parameter count."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    float_count = sum(p.numel() for p in model.parameters())  # BERT's classifier ties nothing
    quantize_(model, bits=4, group_size=32)
    task = TaskConfig(kind="classification", data=str(tiny_csv), text="review", label="sentiment", max_length=16)
    art = Artifact(model=model, tokenizer=AutoTokenizer.from_pretrained(tiny_bert), task=task, labels=[0, 1], swaps=module_swaps(model))
    return art.save(tmp_path_factory.mktemp("quantized") / "q"), float_count


def test_info_and_eval_count_the_parameters_of_a_quantized_model_alike(capsys, quantized_artifact):
    path, float_count = quantized_artifact
    assert main(["info", str(path), "--json", "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)["parameters"]
    assert main(["eval", str(path), "--json", "--no-latency", "--max-examples", "8", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)["parameters"]
    assert info == evaluated == float_count  # packed weights count as the weights they stand for

    assert main(["info", str(path), "--quiet"]) == 0
    info_table = capsys.readouterr().out
    assert main(["eval", str(path), "--no-latency", "--max-examples", "8", "--quiet"]) == 0
    eval_table = capsys.readouterr().out
    assert f"{float_count:,}" in info_table and f"{float_count:,}" in eval_table
    assert "packed quantized weights as the weights they stand for" in info_table
