"""Recipes under torchrun: same result as one process, restart-and-resume, bad launches refused.

Every run here starts real torchrun jobs of 2 CPU processes (gloo).
"""

import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from slimtune.distributed.testing import compare_strategies
from slimtune.recipe import shipped_recipes

from tests.slimtune.test_cli import slimtune_cli

pytestmark = pytest.mark.distributed
STAGES = "- finetune: {epochs: 2}\n- evaluate: {split: test, latency: false}\n"
TRAIN = {"task.limit": 128, "train.batch_size": 16}  # 8 steps per epoch


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning ``marker`` (a run directory)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def max_diff(a, b) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def test_recipe_gives_the_same_result_under_single_ddp_fsdp_and_pipeline(write_recipe, tmp_path):
    report = compare_strategies(write_recipe(STAGES), tmp_path, overrides=TRAIN, strategies=("single", "ddp", "fsdp", "pipeline"))
    assert report.ok, str(report)
    assert {("ddp", "finetune"), ("fsdp", "finetune"), ("pipeline", "finetune")} <= set(report.weight_diff)
    assert ("fsdp", "evaluate", "accuracy") in report.metric_diff
    finetuned = report.runs["fsdp"].stages[0].path
    assert (finetuned / "model.safetensors").is_file() and not (tmp_path / "fsdp" / ".checkpoints").exists()


def test_rank_killed_mid_stage_is_restarted_and_resumes_to_the_same_result(write_recipe, tmp_path):
    recipe = write_recipe(STAGES)
    sets = [f"{k}={v}" for k, v in TRAIN.items()] + ["train.checkpoint_every=3"]
    args = [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "SLIMTUNE_FAIL_AT": "10:1"}  # rank 1 dies after step 10 (epoch 2), last checkpoint at step 9
    killed = subprocess.run([sys.executable, "-m", "slimtune", "run", recipe, "--out", tmp_path / "killed", "--nproc", "2",
                             "--strategy", "fsdp", "--max-restarts", "1", *args], capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == 0, killed.stderr[-3000:]
    assert "resuming from" in killed.stderr and "step-0000009" in killed.stderr
    plain = slimtune_cli("run", recipe, "--out", tmp_path / "plain", "--quiet", *args)
    assert plain.returncode == 0, plain.stderr
    assert max_diff(tmp_path / "killed/01-finetune/model.safetensors", tmp_path / "plain/01-finetune/model.safetensors") < 1e-5
    assert not leftover_processes(str(tmp_path / "killed"))


def test_a_rank_failing_without_restarts_fails_the_run_and_leaves_no_process(write_recipe, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SLIMTUNE_FAIL_AT": "2:1"}
    proc = subprocess.run([sys.executable, "-m", "slimtune", "run", write_recipe(STAGES), "--out", out, "--nproc", "2", "--quiet",
                           "--set", "task.limit=64"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert "the distributed run failed" in proc.stderr and "re-run to resume" in proc.stderr
    assert not leftover_processes(str(out))
    assert not (out / "01-finetune").exists()


@pytest.mark.parametrize("args,message", [
    (["--nproc", str(len(os.sched_getaffinity(0)) + 1)], "more processes than this machine has CPU cores"),
    (["--nproc", "3", "--strategy", "pipeline"], "pipeline with 3 stages, but"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:9"], "rendezvous endpoint 127.0.0.1:9 is unreachable"),
    (["--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29400"], "does not resolve"),
    (["--nnodes", "2"], "needs a rendezvous endpoint"),
    (["--set", "train.device=cuda", "--nproc", "2"], "no CUDA GPU is available"),
])
def test_bad_launch_is_refused_before_any_process_starts(write_recipe, tmp_path, args, message):
    if "cuda" in " ".join(args) and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "run"
    proc = slimtune_cli("run", write_recipe(STAGES), "--out", out, *args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "fix:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not leftover_processes(str(out))


def tiny_overrides(kind: str, tiny_bert, tiny_llama, tiny_csv) -> dict:
    """Point a shipped recipe at the tiny models and data, keeping its stages."""
    model = tiny_llama if kind == "causal-lm" else tiny_bert
    return {"model": str(model), "task.data": str(tiny_csv), "task.text": "review", "task.label": "sentiment",
            "task.max_length": 16, "task.limit": 64, "train.batch_size": 8, "train.eval_batch_size": 16}


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_runs_under_nproc_2(name, tiny_bert_6_layers, tiny_llama, tiny_csv, tmp_path):
    kind = yaml.safe_load(shipped_recipes()[name].read_text())["task"]["kind"]
    sets = [f"{k}={v}" for k, v in tiny_overrides(kind, tiny_bert_6_layers, tiny_llama, tiny_csv).items()]
    proc = slimtune_cli("run", name, "--out", tmp_path / "run", "--nproc", "2", "--quiet", *[a for s in sets for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run directory" in proc.stdout and proc.stdout.count("0") > 0
    stages = yaml.safe_load(shipped_recipes()[name].read_text())["stages"]
    assert len([p for p in (tmp_path / "run").iterdir() if p.is_dir() and not p.name.startswith(".")]) == len(stages)


def test_bad_input_found_inside_a_launched_stage_exits_2_once_with_nothing_written(write_recipe, tmp_path):
    recipe = write_recipe("- finetune: {epochs: 1}\n- distill: {student: {layers: [0, 5]}}\n")  # the tiny BERT has 2 layers
    proc = slimtune_cli("run", recipe, "--out", tmp_path / "run", "--nproc", "2", "--quiet", "--set", "task.limit=32")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("error: student.layers: layer(s) [5] do not exist") == 1
    assert (tmp_path / "run" / "01-finetune").is_dir() and not (tmp_path / "run" / "02-distill").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    assert not leftover_processes(str(tmp_path / "run"))
