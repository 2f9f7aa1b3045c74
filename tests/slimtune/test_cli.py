"""The real CLI, end to end, on a tiny random BERT and a tiny CSV."""

import json
import os
import subprocess
import sys

import pytest

from slimtune.cli import main

FULL = "- finetune: {epochs: 2}\n- evaluate: {runs: 3, warmup: 1}\n- export: {format: onnx}\n"


def slimtune_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimtune", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)


def test_run_info_eval_end_to_end(write_recipe, tmp_path):
    out = tmp_path / "run"
    proc = slimtune_cli("run", write_recipe(FULL), "--out", out, "--quiet", "--set", "stages.finetune.epochs=1")
    assert proc.returncode == 0, proc.stderr
    for col in ("accuracy (test)", "parameters", "PyTorch ms", "ONNX RT ms", "01-finetune", "03-export"):
        assert col in proc.stdout
    assert (out / "03-export" / "model.onnx").is_file() and (out / "report.md").is_file()
    metrics = json.loads((out / "02-evaluate" / "metrics.json").read_text())
    assert {"accuracy", "parameters", "size_mb", "torch_ms", "onnx_ms"} <= set(metrics)
    export = json.loads((out / "03-export" / "metrics.json").read_text())
    assert export["max_abs_diff"] < 1e-4 and export["prediction_agreement"] == 1.0

    info = slimtune_cli("info", out / "03-export")
    assert info.returncode == 0 and "lineage 3" in info.stdout and "export" in info.stdout
    ev = slimtune_cli("eval", out / "01-finetune", "--no-latency", "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == metrics["accuracy"]
    lat = slimtune_cli("latency", out / "01-finetune", out / "03-export", "--rounds", "1", "--runs", "2", "--json")
    assert lat.returncode == 0, lat.stderr
    rows = json.loads(lat.stdout)
    assert [r["artifact"] for r in rows] == [str(out / "01-finetune"), str(out / "03-export")]
    assert rows[0]["ratio"] == 1.0 and all(r["torch_ms"] > 0 for r in rows) and rows[1]["parameters"] == metrics["parameters"]

    again = slimtune_cli("run", write_recipe(FULL), "--out", out, "--quiet", "--set", "stages.finetune.epochs=1")
    assert again.returncode == 0 and again.stdout.count("(reused)") == 3


def test_recipes_lists_shipped(capsys):
    assert main(["recipes"]) == 0
    assert "minilm-sentiment" in capsys.readouterr().out


@pytest.mark.parametrize("case, message", [
    ("yaml", "not valid YAML"),
    ("stage", "unknown stage 'distil'"),
    ("key", "unknown key 'stages.0.finetune.epoch'"),
    ("data", "does not exist"),
    ("column", "no column 'sentiment'"),
    ("model", "does not exist"),
    ("hub", "hub is offline"),
    ("set", "has no '='"),
])
def test_bad_input_exit_2_clear_message_nothing_written(case, message, write_recipe, tmp_path, tiny_csv):
    import pandas as pd

    args = []
    if case == "yaml":
        recipe = tmp_path / "bad.yaml"
        recipe.write_text("name: x\nstages: [\n")
    elif case == "stage":
        recipe = write_recipe("- distil: {}\n")
    elif case == "key":
        recipe = write_recipe("- finetune: {epoch: 1}\n")
    elif case == "data":
        recipe = write_recipe(FULL, data=tmp_path / "nope.csv")
    elif case == "column":
        other = tmp_path / "other.csv"
        pd.read_csv(tiny_csv).rename(columns={"sentiment": "y"}).to_csv(other, index=False)
        recipe = write_recipe(FULL, data=other)
    elif case == "model":
        recipe = write_recipe(FULL, model=tmp_path / "no-such-model")
    elif case == "hub":
        recipe = write_recipe(FULL, model="some-org/some-model")
    else:
        recipe, args = write_recipe(FULL), ["--set", "train.lr"]
    out = tmp_path / "run"
    proc = slimtune_cli("run", recipe, "--out", out, *args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_debug_shows_traceback(write_recipe, tmp_path):
    proc = slimtune_cli("run", write_recipe("- distil: {}\n"), "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_eval_of_a_non_artifact_is_exit_2(tmp_path):
    proc = slimtune_cli("eval", tmp_path)
    assert proc.returncode == 2 and "not a SlimTune artifact" in proc.stderr
