"""Damaged and foreign artifacts: never reused, never loaded, always reported clearly.

A finished run of two measuring stages on the tiny BERT (the second links the
first's weights) is damaged in each way a disk, a copy or a user can damage
it; the rerun must recompute, and ``load``/``info``/``eval`` must refuse with
an ArtifactError (exit 2 from the CLI, no traceback).
"""

import json
import logging
import os
import re
import shutil

import pytest

import slimtune
from slimtune.artifact import META_FILE, WEIGHTS_FILE, file_sha256
from slimtune.cli import main
from slimtune.errors import ArtifactError

from tests.conftest import recipe_text

STAGES = "- evaluate: {latency: false}\n- evaluate: {split: validation, latency: false}\n"


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_bert, tiny_csv):
    path = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    path.write_text(recipe_text(tiny_bert, tiny_csv, STAGES))
    return path


@pytest.fixture(scope="module")
def pristine(recipe, tmp_path_factory):
    out = tmp_path_factory.mktemp("pristine") / "run"
    slimtune.run(recipe, out=out)
    return out


@pytest.fixture
def run_dir(pristine, tmp_path):
    """A private copy of the finished run (copying breaks the hard links; tests that need them make a run)."""
    out = tmp_path / "run"
    shutil.copytree(pristine, out)
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path):
    """Alter one byte in the tensor data, keeping the size (a bit rot a size check cannot see)."""
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.unlink()  # a new inode: the stage's hard-linked twin keeps the good bytes
    path.write_bytes(bytes(data))


def test_intact_run_is_reused_without_warnings(recipe, run_dir, caplog):
    with caplog.at_level(logging.WARNING):
        again = slimtune.run(recipe, out=run_dir)
    assert [r.reused for r in again.stages] == [True, True]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_manifest_records_every_file(run_dir):
    meta = json.loads((run_dir / "01-evaluate" / META_FILE).read_text())
    on_disk = {p.name for p in (run_dir / "01-evaluate").iterdir()} - {META_FILE, "metrics.json"}
    assert set(meta["files"]) == on_disk and WEIGHTS_FILE in on_disk
    for name, entry in meta["files"].items():
        path = run_dir / "01-evaluate" / name
        assert entry["size"] == path.stat().st_size and entry["sha256"] == file_sha256(path)
    assert meta["lineage"][-1]["sha256"] == meta["files"][WEIGHTS_FILE]["sha256"]


def test_truncated_first_stage_is_recomputed_with_everything_after(recipe, tmp_path, caplog):
    out = tmp_path / "run"
    slimtune.run(recipe, out=out)
    first, second = out / "01-evaluate" / WEIGHTS_FILE, out / "02-evaluate" / WEIGHTS_FILE
    assert os.path.samefile(first, second)  # the measuring stage links its input's weights
    truncate(first)  # in place: the linked twin is truncated too
    with caplog.at_level(logging.WARNING):
        again = slimtune.run(recipe, out=out)
    assert [r.reused for r in again.stages] == [False, False]
    warning = caplog.text
    assert "01-evaluate" in warning and WEIGHTS_FILE in warning and "truncated" in warning and "recomputing" in warning
    for stage in again.stages:
        slimtune.load(stage.path)  # both intact again


def test_damaged_later_stage_alone_is_recomputed(recipe, run_dir, caplog):
    flip_byte(run_dir / "02-evaluate" / WEIGHTS_FILE)
    with caplog.at_level(logging.WARNING):
        again = slimtune.run(recipe, out=run_dir)
    assert [r.reused for r in again.stages] == [True, False]
    assert "02-evaluate" in caplog.text and "sha256" in caplog.text
    slimtune.load(again.stages[1].path)


@pytest.mark.parametrize("damage", ["metrics", "meta", "tokenizer-missing"])
def test_other_damaged_files_are_recomputed(damage, recipe, run_dir, caplog):
    stage = run_dir / "01-evaluate"
    if damage == "metrics":
        (stage / "metrics.json").write_text('{"accuracy": 0.5')
    elif damage == "meta":
        (stage / META_FILE).write_text("{not json")
    else:
        (stage / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING):
        again = slimtune.run(recipe, out=run_dir)
    assert [r.reused for r in again.stages] == [False, False]
    assert "01-evaluate" in caplog.text and "recomputing" in caplog.text


def damaged(run_dir, case):
    """Damage (or replace) the first stage; return its path and the message expected."""
    stage = run_dir / "01-evaluate"
    meta_path = stage / META_FILE
    meta = json.loads(meta_path.read_text())
    if case == "truncated":
        truncate(stage / WEIGHTS_FILE)
        return stage, "bytes but slimtune.json records"
    if case == "altered":
        flip_byte(stage / WEIGHTS_FILE)
        return stage, "does not match the sha256"
    if case == "missing-weights":
        (stage / WEIGHTS_FILE).unlink()
        return stage, f"{WEIGHTS_FILE} is missing"
    if case == "dangling-symlink":
        (stage / WEIGHTS_FILE).unlink()
        (stage / WEIGHTS_FILE).symlink_to(run_dir / "nowhere.safetensors")
        return stage, "dangling link"
    if case == "altered-config":
        (stage / "config.json").write_text((stage / "config.json").read_text().replace("32", "33"))
        return stage, "config.json"
    if case == "corrupt-meta":
        meta_path.write_text(meta_path.read_text()[:40])
        return stage, f"{META_FILE} is corrupt"
    if case == "meta-not-an-object":
        meta_path.write_text("[1, 2]")
        return stage, f"{META_FILE} is corrupt"
    if case == "bad-task":
        meta["task"]["kind"] = "regression"
        meta_path.write_text(json.dumps(meta))
        return stage, "task does not validate"
    if case == "newer-format":
        meta["format_version"] = 99
        meta_path.write_text(json.dumps(meta))
        return stage, "uses artifact format 99, newer than 1"
    if case == "old-artifact-altered":  # written before the manifest: checked against the lineage's sha256
        del meta["files"]
        meta_path.write_text(json.dumps(meta))
        flip_byte(stage / WEIGHTS_FILE)
        return stage, "does not match the sha256"
    if case == "plain-hf-model":
        meta_path.unlink()
        return stage, "is not a SlimTune artifact"
    if case == "no-such-directory":
        return run_dir / "07-nothing", "does not exist"
    if case == "a-file":
        return stage / WEIGHTS_FILE, "does not exist"
    raise AssertionError(case)


CASES = ["truncated", "altered", "missing-weights", "dangling-symlink", "altered-config", "corrupt-meta", "meta-not-an-object",
         "bad-task", "newer-format", "old-artifact-altered", "plain-hf-model", "no-such-directory", "a-file"]


@pytest.mark.parametrize("case", CASES)
def test_load_refuses_damaged_or_foreign_artifacts(case, run_dir):
    path, message = damaged(run_dir, case)
    with pytest.raises(ArtifactError, match=re.escape(message)) as err:
        slimtune.load(path)
    assert err.value.hint


@pytest.mark.parametrize("command", ["info", "eval"])
@pytest.mark.parametrize("case", ["truncated", "altered", "corrupt-meta", "newer-format", "plain-hf-model"])
def test_cli_reports_damage_with_exit_2(command, case, run_dir, capsys):
    path, message = damaged(run_dir, case)
    args = [command, str(path)] + (["--no-latency"] if command == "eval" else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "fix:" in err and "Traceback" not in err


def test_symlinked_weights_verify_by_their_target(run_dir, tmp_path):
    stage = run_dir / "01-evaluate"
    target = tmp_path / "elsewhere.safetensors"
    shutil.move(stage / WEIGHTS_FILE, target)
    (stage / WEIGHTS_FILE).symlink_to(target)
    slimtune.load(stage)  # an intact target passes
    truncate(target)
    with pytest.raises(ArtifactError, match="truncated"):
        slimtune.load(stage)


def test_old_artifact_without_manifest_still_loads(run_dir):
    meta_path = run_dir / "01-evaluate" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["files"]
    meta_path.write_text(json.dumps(meta))
    assert slimtune.load(run_dir / "01-evaluate").labels == [0, 1]
