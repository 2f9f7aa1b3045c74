"""compare_strategies' checks: runs that cannot be compared fail loudly instead of comparing less."""

import dataclasses

import pytest

import slimtune
from slimtune.distributed.testing import compare_runs

STAGES = "- finetune: {epochs: 1}\n- evaluate: {split: validation, latency: false}\n"


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bert, tiny_csv):
    from tests.conftest import recipe_text

    recipe = tmp_path_factory.mktemp("recipe") / "recipe.yaml"
    recipe.write_text(recipe_text(tiny_bert, tiny_csv, STAGES))
    return slimtune.run(recipe, overrides={"task.limit": 32}, out=tmp_path_factory.mktemp("run"))


def edited(run, stages=None, **metric_edits):
    """A copy of ``run`` with other stages, or with metrics set (None removes one) on every stage."""
    stages = stages if stages is not None else run.stages
    copies = []
    for stage in stages:
        metrics = {**stage.metrics, **metric_edits}
        copies.append(dataclasses.replace(stage, metrics={k: v for k, v in metrics.items() if v is not None}))
    return dataclasses.replace(run, stages=copies)


def test_a_run_compared_with_itself_agrees_on_every_stage(finished):
    report = compare_runs({"single": finished, "copy": edited(finished)}, {"single": 1, "copy": 1})
    assert report.ok, str(report)
    assert report.weight_diff == {("copy", "finetune"): 0.0, ("copy", "evaluate"): 0.0}
    assert ("copy", "evaluate", "accuracy") in report.metric_diff


def test_a_missing_stage_is_a_failure_not_a_shorter_comparison(finished):
    report = compare_runs({"single": finished, "ddp": edited(finished, stages=finished.stages[:1])}, {"single": 1, "ddp": 1})
    assert not report.ok
    assert any("stages ['finetune'] differ from the reference's ['finetune', 'evaluate']" in f for f in report.failures), report.failures


def test_a_metric_reported_on_one_side_only_is_named(finished):
    report = compare_runs({"single": finished, "ddp": edited(finished, accuracy=None)}, {"single": 1, "ddp": 1})
    assert not report.ok
    assert any("metric 'accuracy' is reported by the reference only" in f for f in report.failures), report.failures


def test_a_run_on_another_world_size_than_requested_fails(finished):
    assert all(stage.metrics["world_size"] == 1 for stage in finished.stages)  # the runner records it on every stage
    report = compare_runs({"single": finished, "ddp": edited(finished)}, {"single": 1, "ddp": 2})
    assert not report.ok
    assert any("ddp finetune: ran on world size 1, not the requested 2" in f for f in report.failures), report.failures
