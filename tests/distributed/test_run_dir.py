"""Run-directory ownership: another recipe, a foreign directory or an artifact is never written over."""

import logging
from pathlib import Path

import pytest
import yaml

import slimtune
from slimtune.cli import main
from slimtune.distributed import launch, runner
from slimtune.errors import RunFailed, SlimTuneError
from slimtune.recipe import load_recipe

STAGES = "- finetune: {epochs: 1, max_steps: 1}\n- evaluate: {latency: false, max_examples: 16}\n"
OTHER_STAGES = "- evaluate: {latency: false, max_examples: 16}\n"


def snapshot(root: Path) -> dict:
    """Every entry under ``root`` (hidden ones too) with the bytes of each file."""
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def owner(run_dir: Path) -> str:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["name"]


def stage_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def other_recipe(write_recipe):
    """A recipe named ``other`` (the fixtures' recipes are named ``tiny``)."""
    path = write_recipe(OTHER_STAGES, name="other.yaml")
    path.write_text(path.read_text().replace("name: tiny", "name: other", 1))
    return path


@pytest.fixture
def finished_run(write_recipe, tmp_path):
    """A finished two-stage run of recipe ``tiny`` in ``tmp_path/run``."""
    out = tmp_path / "run"
    slimtune.run(write_recipe(STAGES), out=out)
    assert stage_dirs(out) == ["01-finetune", "02-evaluate"]
    return out


def refuse(capsys, *args) -> str:
    """Run the CLI, expect exit code 2, return what it printed on stderr."""
    capsys.readouterr()
    assert main(["run", *map(str, args), "--quiet"]) == 2
    return capsys.readouterr().err


def test_other_recipe_is_refused_and_the_run_is_untouched(finished_run, other_recipe, capsys):
    before = snapshot(finished_run)
    err = refuse(capsys, other_recipe, "--out", finished_run)
    assert "recipe 'tiny'" in err and "01-finetune, 02-evaluate" in err and "'other'" in err
    assert "another --out" in err and "--fresh" in err
    with pytest.raises(SlimTuneError, match="holds the run of recipe 'tiny'"):
        slimtune.run(other_recipe, out=finished_run)
    assert snapshot(finished_run) == before


def test_fresh_replaces_another_recipes_run_before_its_first_stage(finished_run, other_recipe, monkeypatch):
    from slimtune.eval import stage as eval_stage

    (finished_run / "report.md").write_text("the report of tiny")

    def crash(*args, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(eval_stage, "evaluate_artifact", crash)
    with pytest.raises(RuntimeError, match="boom"):
        slimtune.run(other_recipe, out=finished_run, fresh=True)
    # Replaced before the first stage ran: no stage of 'tiny' is left to mix with 'other's.
    assert owner(finished_run) == "other" and stage_dirs(finished_run) == [] and not (finished_run / "report.md").exists()
    monkeypatch.undo()
    result = slimtune.run(other_recipe, out=finished_run)  # now 'other' owns it: a plain re-run resumes
    assert [r.path.name for r in result.stages] == ["01-evaluate"] and stage_dirs(finished_run) == ["01-evaluate"]


def test_fresh_through_the_cli_replaces_and_writes_the_new_report(finished_run, other_recipe):
    assert main(["run", str(other_recipe), "--out", str(finished_run), "--fresh", "--quiet"]) == 0
    assert owner(finished_run) == "other" and stage_dirs(finished_run) == ["01-evaluate"]
    assert "other" in (finished_run / "report.md").read_text()


def test_same_recipe_reuses_and_an_empty_directory_is_accepted(write_recipe, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    recipe = write_recipe(STAGES)
    assert [r.reused for r in slimtune.run(recipe, out=out).stages] == [False, False]
    assert [r.reused for r in slimtune.run(recipe, out=out).stages] == [True, True]
    edited = slimtune.run(recipe, overrides={"stages.evaluate.max_examples": 8}, out=out)  # same name, edited
    assert [r.reused for r in edited.stages] == [True, False]


@pytest.mark.parametrize("contents", [
    {"notes.txt": "mine"},
    {"01-data/rows.csv": "a,b\n"},  # named like a stage, but no artifact in it
    {"recipe.yaml": "name: other\n", "train.csv": "a,b\n"},  # a project folder with its own recipe
])
def test_a_directory_that_is_not_a_run_is_refused_even_with_fresh(contents, write_recipe, tmp_path, capsys):
    out = tmp_path / "mine"
    for name, text in contents.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    before = snapshot(out)
    for fresh in ([], ["--fresh"]):
        err = refuse(capsys, write_recipe(STAGES), "--out", out, *fresh)
        assert "not a SlimTune run directory" in err and "new or empty directory" in err
    assert snapshot(out) == before


def test_finished_stages_without_recipe_yaml_need_fresh(finished_run, write_recipe, capsys):
    (finished_run / "recipe.yaml").unlink()
    before = snapshot(finished_run)
    err = refuse(capsys, write_recipe(STAGES), "--out", finished_run)
    assert "recipe.yaml is missing" in err and "01-finetune, 02-evaluate" in err
    assert snapshot(finished_run) == before
    assert main(["run", str(write_recipe(STAGES)), "--out", str(finished_run), "--fresh", "--quiet"]) == 0
    assert owner(finished_run) == "tiny" and stage_dirs(finished_run) == ["01-finetune", "02-evaluate"]


@pytest.mark.parametrize("inside, message", [
    ("01-finetune", "is an artifact directory"),
    ("01-finetune/nested/run", "lies inside the artifact directory"),
    ("05-export", "keeps a stage or its checkpoints"),  # a stage the owner's next re-run would delete
    (".checkpoints/run", "keeps a stage or its checkpoints"),
])
def test_out_in_an_artifact_or_at_a_stage_of_a_run_is_refused(inside, message, finished_run, other_recipe, capsys):
    before = snapshot(finished_run)
    for recipe in (other_recipe, finished_run / "recipe.yaml"):  # another recipe, and the owner itself
        assert message in refuse(capsys, recipe, "--out", finished_run / inside)
    assert snapshot(finished_run) == before


def test_out_that_is_a_file_is_refused(write_recipe, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert "is a file" in refuse(capsys, write_recipe(STAGES), "--out", out)
    assert out.read_text() == "x"


def test_launcher_refuses_before_torchrun_and_ranks_accept_what_it_prepared(finished_run, other_recipe, monkeypatch):
    def no_launch(*args, **kw):
        raise AssertionError("torchrun was launched")

    monkeypatch.setattr(launch, "launch", no_launch)
    before = snapshot(finished_run)
    ddp = {"distributed.strategy": "ddp", "distributed.nproc": 2}
    with pytest.raises(SlimTuneError, match="holds the run of recipe 'tiny'"):
        slimtune.run(other_recipe, overrides=ddp, out=finished_run)
    assert snapshot(finished_run) == before
    # With --fresh the launcher replaces the run and writes its recipe; each rank then loads that
    # recipe.yaml and must accept the directory, also as a restarted rank (fresh no longer set).
    recipe = load_recipe(other_recipe, ddp)
    runner.check_out_dir(finished_run, recipe, fresh=True)
    runner._prepare_run_dir(finished_run, recipe, fresh=True)
    rank_recipe = load_recipe(finished_run / "recipe.yaml")
    for fresh in (True, False):
        runner.check_out_dir(finished_run, rank_recipe, fresh)
    assert stage_dirs(finished_run) == []


def test_collect_says_why_a_stage_is_unfinished_without_promising_to_recompute(finished_run, write_recipe, caplog):
    (finished_run / "02-evaluate" / "config.json").unlink()  # hard-linked: 01-finetune keeps its copy
    recipe = load_recipe(write_recipe(STAGES))
    with caplog.at_level(logging.WARNING), pytest.raises(RunFailed, match="stage 02 evaluate did not finish: .*damaged"):
        runner._collect(recipe, finished_run)
    assert "recomputing" not in caplog.text


@pytest.mark.distributed
def test_torchrun_refuses_in_the_launcher_and_its_ranks_run_the_replaced_directory(finished_run, other_recipe):
    from tests.slimtune.test_cli import slimtune_cli

    before = snapshot(finished_run)
    args = ("run", other_recipe, "--out", finished_run, "--nproc", "2", "--quiet", "--set", "task.limit=32")
    refused = slimtune_cli(*args)
    assert refused.returncode == 2 and "holds the run of recipe 'tiny'" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and snapshot(finished_run) == before
    replaced = slimtune_cli(*args, "--fresh")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    assert owner(finished_run) == "other" and stage_dirs(finished_run) == ["01-evaluate"]
