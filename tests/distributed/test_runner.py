import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import slimtune
from slimtune.errors import SlimTuneError

STAGES = "- finetune: {epochs: 1}\n- evaluate: {latency: false}\n- evaluate: {split: validation, latency: false}\n"


def stage_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def mtimes(run_dir: Path) -> dict:
    return {p.name: (p / "slimtune.json").stat().st_mtime_ns for p in run_dir.iterdir() if p.is_dir()}


def test_rerun_reuses_and_changes_redo_only_downstream(write_recipe, tmp_path):
    recipe, out = write_recipe(STAGES), tmp_path / "run"
    first = slimtune.run(recipe, out=out)
    assert [r.reused for r in first.stages] == [False, False, False]
    assert stage_dirs(out) == ["01-finetune", "02-evaluate", "03-evaluate"]
    stamp = mtimes(out)

    second = slimtune.run(recipe, out=out)
    assert [r.reused for r in second.stages] == [True, True, True]
    assert mtimes(out) == stamp
    assert second.stages[1].metrics == first.stages[1].metrics

    third = slimtune.run(recipe, overrides={"stages.1.max_examples": 10}, out=out)
    assert [r.reused for r in third.stages] == [True, False, False]
    assert third.stages[1].metrics["examples"] == 10
    assert mtimes(out)["01-finetune"] == stamp["01-finetune"]

    fourth = slimtune.run(recipe, overrides={"train.lr": 1e-3}, out=out)
    assert [r.reused for r in fourth.stages] == [False, False, False]
    assert [r.reused for r in slimtune.run(recipe, out=out, fresh=True).stages] == [False, False, False]


def test_lineage_and_hard_linked_weights(write_recipe, tmp_path):
    result = slimtune.run(write_recipe(STAGES), out=tmp_path / "run")
    art = slimtune.load(result.stages[1].path)
    assert [e["stage"] for e in art.lineage] == ["source", "finetune", "evaluate"]
    assert art.lineage[-1]["sha256"] == art.lineage[-2]["sha256"] != art.lineage[0]["sha256"]
    from slimtune.artifact import file_sha256

    assert art.lineage[0]["sha256"] == file_sha256(Path(art.lineage[0]["model"]) / "model.safetensors")
    assert art.lineage[-1]["config"]["latency"] is False
    w1, w2 = (result.stages[i].path / "model.safetensors" for i in (0, 1))
    assert os.path.samefile(w1, w2)  # a measuring stage links its input's weights
    recipe = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "warmup_ratio: 0.0" in recipe and "grad_accum: 1" in recipe  # resolved defaults


def test_shortened_recipe_removes_stale_stages(write_recipe, tmp_path):
    out = tmp_path / "run"
    slimtune.run(write_recipe(STAGES), out=out)
    slimtune.run(write_recipe("- finetune: {epochs: 1}\n", name="short.yaml"), out=out)
    assert stage_dirs(out) == ["01-finetune"]


def test_failing_stage_keeps_finished_work_and_leaves_nothing_half_written(write_recipe, tmp_path, monkeypatch):
    from slimtune.eval import stage as eval_stage

    out = tmp_path / "run"
    calls = {"n": 0}
    real = eval_stage.evaluate_artifact

    def crash(*args, **kw):
        calls["n"] += 1
        (Path(args[0].path).parent / "sentinel").write_text("x")
        raise RuntimeError("boom")

    monkeypatch.setattr(eval_stage, "evaluate_artifact", crash)
    with pytest.raises(RuntimeError, match="boom"):
        slimtune.run(write_recipe(STAGES), out=out)
    assert stage_dirs(out) == ["01-finetune"] and not list(out.glob(".*"))  # no 02-evaluate, no temporary
    monkeypatch.setattr(eval_stage, "evaluate_artifact", real)
    again = slimtune.run(write_recipe(STAGES), out=out)
    assert [r.reused for r in again.stages] == [True, False, False]


KILL_SCRIPT = """
import sys, time
from slimtune.eval import stage
def slow(*a, **k):
    time.sleep(60)
stage.evaluate_artifact = slow
from slimtune.cli import main
sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2], "--quiet"]))
"""


def test_run_killed_mid_stage_leaves_no_corrupt_stage(write_recipe, tmp_path):
    recipe, out = write_recipe(STAGES), tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(recipe), str(out)], env={**os.environ, "SLIMTUNE_QUIET": "1"})
    deadline = time.time() + 240
    while time.time() < deadline and not list(out.glob(".02-evaluate.tmp-*")):
        time.sleep(0.2)
    assert list(out.glob(".02-evaluate.tmp-*")), "the run never reached stage 2"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stage_dirs(out) == ["01-finetune"]  # the killed stage exists only as a hidden temporary
    assert list(out.glob(".02-evaluate.tmp-*"))
    assert slimtune.load(out / "01-finetune").model is not None  # the finished stage is intact
    result = slimtune.run(recipe, out=out)
    assert [r.reused for r in result.stages] == [True, False, False]
    assert not list(out.glob(".*"))  # the dead run's temporary directory was cleaned up


def test_bad_input_writes_nothing(write_recipe, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SlimTuneError, match="does not exist"):
        slimtune.run(write_recipe(STAGES, data=tmp_path / "missing.csv"), out=out)
    with pytest.raises(SlimTuneError, match="does not exist"):
        slimtune.run(write_recipe(STAGES, model=tmp_path / "no-model"), out=out)
    assert not out.exists()


@pytest.mark.parametrize("kind, metric", [("embedding", "centroid_accuracy"), ("causal-lm", "perplexity")])
def test_other_task_kinds_train_and_evaluate(kind, metric, write_recipe, tmp_path, request):
    model = request.getfixturevalue("tiny_llama") if kind == "causal-lm" else request.getfixturevalue("tiny_bert")
    stages = "- evaluate: {latency: false}\n- finetune: {epochs: 1}\n- evaluate: {latency: false}\n"
    result = slimtune.run(write_recipe(stages, kind=kind, model=model), out=tmp_path / "run")
    before, after = result.stages[0].metrics[metric], result.stages[2].metrics[metric]
    assert after > before if metric == "centroid_accuracy" else after < before
    assert result.stages[1].metrics["split"] == "validation" and metric in result.stages[1].metrics
    assert slimtune.load(result.stages[2].path).task.kind == kind


def test_same_recipe_gives_bit_identical_weights(write_recipe, tmp_path):
    recipe = write_recipe("- finetune: {epochs: 1}\n")
    a = slimtune.run(recipe, out=tmp_path / "a").stages[0].path
    b = slimtune.run(recipe, out=tmp_path / "b").stages[0].path
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
