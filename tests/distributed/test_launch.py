"""Recipes under torchrun: same result as one process, restart-and-resume, bad launches refused.

Every run here starts real torchrun jobs of 2 CPU processes (gloo).
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.distributed.launch import cpu_cores
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
    # compare_strategies' default atol 1e-5: only summation order differs, a gradient sums
    # K = 16 x 16 = 256 terms (K * 2^-24 = 1.5e-5 relative, doubled by Adam's m / sqrt(v)),
    # over T = 16 steps of at most lr = 5e-3: 16 * 5e-3 * 3e-5 = 2.4e-6, times 4 for feedback.
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
    # FSDP x2 resumed against one process: summation order only, T = 16 steps, same bound as above.
    assert max_diff(tmp_path / "killed/01-finetune/model.safetensors", tmp_path / "plain/01-finetune/model.safetensors") < 1e-5
    assert not leftover_processes(str(tmp_path / "killed"))


def worker_pid(marker: str, rank: int) -> int | None:
    """The pid of the torchrun worker of ``rank`` whose command line mentions ``marker`` (Linux /proc)."""
    for entry in Path("/proc").iterdir():
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # not a process, gone, or not ours
            continue
        if marker.encode() in args and b"torch.distributed.run" not in args and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


def kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, rank: int, timeout: float = 240) -> None:
    """From outside the job: wait for a finished checkpoint under ``run_dir``, then SIGKILL ``rank``'s worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        done = any(not p.name.endswith(".tmp") for p in (run_dir / ".checkpoints").glob("*/step-*"))
        pid = worker_pid(str(run_dir), rank) if done else None
        if pid:
            os.kill(pid, signal.SIGKILL)
            return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint appeared under {run_dir} while the job ran (exit code {proc.poll()})")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker to kill through Linux /proc")
def test_worker_killed_from_outside_resumes_bitwise_with_dropout(tiny_bert_dropout, tiny_csv, tmp_path):
    """A restarted DDP job reproduces the uninterrupted one exactly, dropout masks included (same world size and threads)."""
    from tests.conftest import recipe_text

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_bert_dropout, tiny_csv, "- finetune: {epochs: 2, eval_split: none}\n"))
    sets = [f"{k}={v}" for k, v in TRAIN.items()] + ["train.checkpoint_every=5"]  # 16 steps, checkpoints at 5, 10, 15
    args = ["--nproc", "2", "--strategy", "ddp", "--max-restarts", "1", *[a for s in sets for a in ("--set", s)]]
    killed_dir, plain_dir = tmp_path / "killed", tmp_path / "plain"
    with open(tmp_path / "killed.err", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "slimtune", "run", recipe, "--out", killed_dir, *args], stderr=err,
                                stdout=subprocess.DEVNULL)
        try:
            kill_after_first_checkpoint(proc, killed_dir, rank=1)
            assert proc.wait(timeout=300) == 0, (tmp_path / "killed.err").read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = (tmp_path / "killed.err").read_text()
    assert "resuming from" in stderr and "step-00000" in stderr, stderr[-3000:]  # restarted mid-stage, not from scratch
    plain = slimtune_cli("run", recipe, "--out", plain_dir, "--quiet", *args)
    assert plain.returncode == 0, plain.stderr[-3000:]
    resumed, uninterrupted = (load_file(str(d / "01-finetune/model.safetensors")) for d in (killed_dir, plain_dir))
    assert resumed.keys() == uninterrupted.keys()
    different = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}: max {max_diff(killed_dir / '01-finetune/model.safetensors', plain_dir / '01-finetune/model.safetensors'):.2e}"
    assert not leftover_processes(str(killed_dir))


def test_a_rank_failing_without_restarts_fails_the_run_and_leaves_no_process(write_recipe, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "SLIMTUNE_FAIL_AT": "2:1"}
    proc = subprocess.run([sys.executable, "-m", "slimtune", "run", write_recipe(STAGES), "--out", out, "--nproc", "2", "--quiet",
                           "--set", "task.limit=64"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1
    assert "the distributed run failed" in proc.stderr and "re-run to resume" in proc.stderr
    assert not leftover_processes(str(out))
    assert not (out / "01-finetune").exists()


def closed_port() -> int:
    """A local TCP port nothing listens on: one the OS just handed out for a socket that is closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args,message", [
    (["--nproc", str(cpu_cores() + 1)], "more processes than this machine has CPU cores"),
    (["--nproc", "3", "--strategy", "pipeline"], "pipeline with 3 stages, but"),
    (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "127.0.0.1:{closed}"], "rendezvous endpoint 127.0.0.1:{closed} is unreachable"),
    (["--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:29400"], "does not resolve"),
    (["--nnodes", "2"], "needs a rendezvous endpoint"),
    (["--set", "train.device=cuda", "--nproc", "2"], "no CUDA GPU is available"),
])
def test_bad_launch_is_refused_before_any_process_starts(write_recipe, tmp_path, args, message):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    port = closed_port()
    args, message = [a.format(closed=port) for a in args], message.format(closed=port)
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
    stages = [next(iter(s)) for s in yaml.safe_load(shipped_recipes()[name].read_text())["stages"]]
    assert f"run directory: {tmp_path / 'run'}" in proc.stdout, proc.stdout  # rank 0 alone reports, after the job
    assert all(stage in proc.stdout for stage in stages), (stages, proc.stdout)  # the table lists every stage
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.is_dir() and not p.name.startswith(".")) == \
        [f"{i:02d}-{stage}" for i, stage in enumerate(stages, start=1)]


def test_bad_input_found_inside_a_launched_stage_exits_2_once_with_nothing_written(write_recipe, tmp_path):
    # A teacher directory is read only when the stage runs (a bad layer list is refused at validation now).
    missing = tmp_path / "no-such-teacher"
    recipe = write_recipe(f"- finetune: {{epochs: 1}}\n- distill: {{student: {{layers: [0]}}, teacher: {missing}}}\n")
    proc = slimtune_cli("run", recipe, "--out", tmp_path / "run", "--nproc", "2", "--quiet", "--set", "task.limit=32")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count(f"error: artifact directory {str(missing)!r} does not exist") == 1
    assert (tmp_path / "run" / "01-finetune").is_dir() and not (tmp_path / "run" / "02-distill").exists()
    assert not [p for p in (tmp_path / "run").iterdir() if ".tmp-" in p.name]
    assert not leftover_processes(str(tmp_path / "run"))
