"""Report rows of the compression stages show what the stage did, from the metrics it returned."""

import pytest

import slimtune
from slimtune.eval.report import COLUMNS, format_count, stage_row, write_summary

SMALL = {"task.limit": 64}


def notes(row: list[str]) -> str:
    return row[COLUMNS.index("notes")]


def test_quantize_row_shows_modules_schemes_and_weight_megabytes():
    metrics = {"weight_mb": 0.0325, "weight_mb_before": 0.0918, "quantized_modules": 14, "world_size": 1, "seconds": 0.4}
    compression = {"quantize": {"method": "rtn", "embedding": None, "modules": {
        "a": {"bits": 4, "group_size": 32, "symmetric": False}, "b": {"bits": 8, "group_size": None, "symmetric": True}}}}
    text = notes(stage_row("02-quantize", False, metrics, compression))
    assert "14 modules quantized (4-bit g32, 8-bit per-channel), weights 0.0918 -> 0.0325 MB" in text
    assert "14 modules quantized, weights 0.0918 -> 0.0325 MB" in notes(stage_row("02-quantize", False, metrics))


def test_share_row_shows_unique_parameters_before_and_after():
    metrics = {"groups": [[0, 1], [2, 3]], "unique_parameters_before": 38_496, "unique_parameters_after": 20_064,
               "parameters": 20_064, "world_size": 1, "seconds": 0.1}
    row = stage_row("03-share", False, metrics)
    assert "2 shared groups, unique parameters 38,496 -> 20,064" in notes(row)
    assert row[COLUMNS.index("parameters")] == "20,064"


def test_prune_rows_show_measured_sparsity_or_the_parameters_removed():
    compression = {"prune": {"method": "wanda", "pattern": "2:4", "overall": 0.5}}
    text = notes(stage_row("02-prune", False, {"sparsity": 0.5, "world_size": 1, "seconds": 0.2}, compression))
    assert "measured sparsity 0.5000 (wanda, 2:4)" in text
    structured = {"parameters_before": 2_500_000, "block_parameters_before": 800_000, "block_parameters_after": 400_000,
                  "parameters": 2_100_000, "world_size": 1, "seconds": 0.2}
    row = stage_row("02-prune", False, structured)
    assert "parameters 2.50M -> 2.10M, blocks 800,000 -> 400,000" in notes(row)
    assert row[COLUMNS.index("parameters")] == "2.10M"


def test_parameter_counts_are_exact_below_a_million():
    assert (format_count(14_866), format_count(22_713_216)) == ("14,866", "22.71M")


@pytest.mark.parametrize("stages, expected", [
    ("- prune: {method: magnitude, sparsity: 0.5}\n- quantize: {bits: 4, group_size: 32}\n",
     {"01-prune": "measured sparsity 0.5000 (magnitude)", "02-quantize": "modules quantized (4-bit g32), weights "}),
    ("- share: {every: 2}\n", {"01-share": "1 shared group, unique parameters "}),
])
def test_report_of_a_real_run_fills_the_compression_rows(write_recipe, tmp_path, stages, expected):
    result = slimtune.run(write_recipe(stages), overrides=SMALL, out=tmp_path / "run")
    report = write_summary(result).read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| 0")}
    for name, note in expected.items():
        assert note in rows[name]
