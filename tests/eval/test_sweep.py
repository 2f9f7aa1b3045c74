"""Bench specs: sweeps crossed and zipped, recipe lists, variant names, every bad input refused up front, stage sharing."""

import itertools
import re
import textwrap
from pathlib import Path

import pytest

from slimtune.errors import RecipeError
from slimtune.eval.sweep import (MAX_NAME_LENGTH, MAX_VARIANTS, Variant, common_stages, load_sweep, shared_prefix,
                                 short_labels, unique_names)
from slimtune.recipe import load_recipe

# Modelled on the shipped minilm-sentiment recipe; validating it reads at most the model's config.json.
RECIPE = """\
name: mini
model: embedded:minilm
task: {kind: classification, data: embedded:rotten-tomatoes, text: text, label: label, max_length: 64}
train: {batch_size: 16, lr: 5.0e-5, seed: 0}
distributed: {strategy: single, nproc: 1}
stages:
  - finetune: {epochs: 1}
  - distill: {student: {layers: [0, 2, 4]}, temperature: 2.0, epochs: 1}
  - quantize: {bits: 8}
"""
SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=,+-]*$")


def write(tmp_path: Path, sweep: str, name: str = "spec.yaml", recipe: str = RECIPE) -> Path:
    path = tmp_path / name
    path.write_text(recipe + textwrap.dedent(sweep))
    return path


def refused(spec: Path, *needles: str, overrides: dict | None = None) -> str:
    """Load ``spec`` expecting a RecipeError whose message names the file and every needle."""
    with pytest.raises(RecipeError) as info:
        load_sweep(spec, overrides)
    message = str(info.value)
    for needle in (str(spec), *needles):
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


# ---------------------------------------------------------------- sweeps


def test_cross_runs_every_combination_first_path_slowest(tmp_path):
    spec = write(tmp_path, """\
        sweep:
          values:
            stages.quantize.method: [rtn, gptq]
            stages.quantize.bits: [8, 4]
        """)
    name, variants = load_sweep(spec)
    assert name == "mini"
    expected = [{"stages.quantize.method": m, "stages.quantize.bits": b} for m, b in itertools.product(["rtn", "gptq"], [8, 4])]
    assert [v.overrides for v in variants] == expected
    assert [v.name for v in variants] == ["method=rtn,bits=8", "method=rtn,bits=4", "method=gptq,bits=8", "method=gptq,bits=4"]
    for v in variants:
        assert isinstance(v, Variant) and v.recipe == str(spec)
        # The validated recipe is what load_recipe makes of the same overrides on the recipe without its sweep.
        assert v.config.resolved() == load_recipe(write(tmp_path, "", "plain.yaml"), v.overrides).resolved()
        quant = v.config.stages[2].resolved()
        assert (quant["method"], quant["bits"]) == (v.overrides["stages.quantize.method"], v.overrides["stages.quantize.bits"])


def test_combination_refused_by_the_stage_names_both_values(tmp_path):
    # 8-bit weights are per channel here: bits=8 with group_size=128 is refused by the quantize stage's own check.
    spec = write(tmp_path, "sweep: {stages.quantize.bits: [8, 4], stages.quantize.group_size: [128, 32]}\n")
    refused(spec, "sweep variant 1 of 4", "stages.quantize.bits=8", "stages.quantize.group_size=128", "per output channel")


def test_zip_pairs_values_and_set_applies_to_every_variant(tmp_path):
    spec = write(tmp_path, """\
        sweep:
          mode: zip
          values:
            stages.quantize.bits: [8, 4]
            stages.quantize.method: [rtn, gptq]
        """)
    _, variants = load_sweep(spec, overrides={"train.lr": 3e-5})
    assert [v.name for v in variants] == ["bits=8,method=rtn", "bits=4,method=gptq"]
    assert [(v.config.stages[2].config.bits, v.config.stages[2].config.method) for v in variants] == [(8, "rtn"), (4, "gptq")]
    assert all(v.overrides["train.lr"] == 3e-5 and v.config.train.lr == 3e-5 for v in variants)


def test_short_form_is_cross_and_list_values_name_safely(tmp_path):
    spec = write(tmp_path, """\
        sweep: {stages.distill.student.layers: [[0, 3], [0, 2, 4]], stages.distill.temperature: [2.0, 4.0]}
        """)
    _, variants = load_sweep(spec)
    assert [v.name for v in variants] == ["layers=0_3,temperature=2.0", "layers=0_3,temperature=4.0",
                                          "layers=0_2_4,temperature=2.0", "layers=0_2_4,temperature=4.0"]
    assert [list(v.config.stages[1].config.student.layers) for v in variants] == [[0, 3], [0, 3], [0, 2, 4], [0, 2, 4]]
    assert all(SAFE.match(v.name) for v in variants)


def test_same_last_component_is_told_apart_by_the_stage(tmp_path):
    spec = write(tmp_path, "sweep: {stages.finetune.epochs: [1, 2], stages.distill.epochs: [3]}\n")
    _, variants = load_sweep(spec)
    assert [v.name for v in variants] == ["finetune.epochs=1,distill.epochs=3", "finetune.epochs=2,distill.epochs=3"]


def test_short_labels_take_the_shortest_distinguishing_suffix():
    labels = short_labels(["stages.distill.epochs", "stages.finetune.epochs", "train.lr", "stages.2.bits"])
    assert labels == {"stages.distill.epochs": "distill.epochs", "stages.finetune.epochs": "finetune.epochs",
                      "train.lr": "lr", "stages.2.bits": "bits"}


def test_unique_names_are_safe_case_insensitively_unique_and_deterministic():
    raw = ["a/b", "a_b", "A_B", "a_b-2", ".hidden", "-opt", "x" * 300, "x" * 300 + "y"]
    names = unique_names(raw)
    assert names == unique_names(raw)
    assert len({n.lower() for n in names}) == len(names)
    assert all(SAFE.match(n) and len(n) <= MAX_NAME_LENGTH for n in names)
    # The first of a repeat keeps the name; a suffix never takes a name another variant has by itself.
    assert names[:4] == ["a_b", "a_b-3", "A_B-4", "a_b-2"]
    assert names[4:6] == ["hidden", "opt"]


def test_string_values_with_unsafe_characters_still_give_unique_safe_names(tmp_path):
    spec = write(tmp_path, "sweep: {task.data: [embedded:rotten-tomatoes, embedded/rotten-tomatoes]}\n")
    _, variants = load_sweep(spec)
    assert [v.name for v in variants] == ["data=embedded_rotten-tomatoes", "data=embedded_rotten-tomatoes-2"]


# ---------------------------------------------------------------- bad sweeps


def test_unknown_stage_in_a_path_is_refused(tmp_path):
    refused(write(tmp_path, "sweep: {stages.quant.bits: [8, 4]}\n"), "stages.quant.bits", "'quant'", "sweep variant 1 of 2")


def test_unknown_key_in_a_path_is_refused(tmp_path):
    message = refused(write(tmp_path, "sweep: {stages.quantize.bitz: [8, 4]}\n"), "stages.quantize.bitz", "unknown key")
    assert "allowed keys" in message


def test_wrong_value_in_a_later_variant_is_refused_before_any_runs(tmp_path):
    message = refused(write(tmp_path, "sweep: {stages.quantize.bits: [8, 4, 4, 8, 3]}\n"),
                      "sweep variant 5 of 5", "stages.quantize.bits=3", "bits=3 is not supported")
    assert "variant 1 " not in message


def test_value_of_the_wrong_type_is_refused(tmp_path):
    refused(write(tmp_path, "sweep: {train.lr: [1.0e-4, fast]}\n"), "train.lr='fast'", "valid number")


@pytest.mark.parametrize("sweep, needles", [
    ("sweep: {stages.quantize.bits: []}\n", ["stages.quantize.bits", "empty"]),
    ("sweep: {stages.quantize.bits: 4}\n", ["stages.quantize.bits", "must be a list", "[4]"]),
    ("sweep: {mode: zip, values: {stages.quantize.bits: [8, 4], stages.quantize.group_size: [32]}}\n",
     ["stages.quantize.bits", "equally long", "'stages.quantize.group_size': 1"]),
    ("sweep: {mode: grid, values: {stages.quantize.bits: [8, 4]}}\n", ["'grid'", "cross, zip"]),
    ("sweep: {stages.quantize.bits: [8, 4, 8]}\n", ["'bits=8'", "'bits=8-2'", "stages.quantize.bits=8", "same recipe"]),
    ("sweep:\n", ["sweep: has no values"]),
    ("sweep: {mode: zip}\n", ["sweep: has no values"]),
    ("sweep: {values: {}}\n", ["sweep: has no values"]),
    ("sweep: [stages.quantize.bits]\n", ["must be a mapping"]),
    ("sweep: {mode: zip, stages.quantize.bits: [8]}\n", ["stages.quantize.bits", "allowed keys: mode, values"]),
    ("sweep: {name: [a, b]}\n", ["'name' cannot vary"]),
])
def test_bad_sweeps_name_the_file_and_path(tmp_path, sweep, needles):
    refused(write(tmp_path, sweep), *needles)


def test_sweep_errors_give_the_line(tmp_path):
    spec = write(tmp_path, "sweep:\n  values:\n    stages.quantize.bits: []\n")
    line = RECIPE.count("\n") + 3  # the recipe, then sweep:, values:, and the path
    refused(spec, f"{spec}:{line}: sweep path stages.quantize.bits")


def test_too_many_variants_are_refused(tmp_path):
    count = MAX_VARIANTS + 1
    refused(write(tmp_path, f"sweep: {{train.seed: {list(range(count))}, stages.quantize.bits: [8]}}\n"), str(count), "train.seed (257)")


def test_set_of_a_swept_path_is_refused(tmp_path):
    refused(write(tmp_path, "sweep: {stages.quantize.bits: [8, 4]}\n"), "stages.quantize.bits", "--set",
            overrides={"stages.quantize.bits": 4})


def test_a_recipe_without_sweep_is_refused(tmp_path):
    refused(write(tmp_path, ""), "neither a sweep: block nor a bench: list")


# ---------------------------------------------------------------- recipe lists


def test_bench_lists_recipes_by_name_and_path_with_set(tmp_path):
    write(tmp_path, "", "mini.yaml")
    (tmp_path / "compare.yaml").write_text(textwrap.dedent("""\
        bench:
          name: compare
          recipes:
            - minilm-sentiment
            - mini.yaml
            - recipe: mini.yaml
              set: {stages.quantize.bits: 4}
        """))
    name, variants = load_sweep(tmp_path / "compare.yaml", overrides={"train.seed": 1})
    assert name == "compare"
    assert [v.name for v in variants] == ["minilm-sentiment", "mini", "mini,bits=4"]
    assert [v.recipe for v in variants] == ["minilm-sentiment", str(tmp_path / "mini.yaml"), str(tmp_path / "mini.yaml")]
    assert [v.overrides for v in variants] == [{"train.seed": 1}, {"train.seed": 1}, {"train.seed": 1, "stages.quantize.bits": 4}]
    assert variants[0].config.resolved() == load_recipe("minilm-sentiment", {"train.seed": 1}).resolved()
    assert variants[2].config.stages[2].resolved()["bits"] == 4


@pytest.mark.parametrize("bench, needles", [
    ("bench: {name: b, recipes: []}\n", ["bench.recipes must be a non-empty list"]),
    ("bench: {name: b, recipes: [no-such-recipe]}\n", ["bench.recipes[0]", "'no-such-recipe'"]),
    ("bench: {name: b, recipes: [mini.yaml, mini.yaml]}\n", ["'mini'", "'mini-2'", "same recipe"]),
    ("bench: {name: b, recipes: [{recipe: mini.yaml, set: {stages.quant.bits: 4}}]}\n", ["bench.recipes[0]", "stages.quant.bits", "'quant'"]),
    ("bench: {name: b, recipes: [{recipe: mini.yaml, set: {stages.quantize.bits: x}}]}\n", ["bench.recipes[0]", "stages.quantize.bits"]),
    ("bench: {name: b, recipes: [{path: mini.yaml}]}\n", ["bench.recipes[0] must be a recipe name or path"]),
    ("bench: {name: b, recipes: [swept.yaml]}\n", ["bench.recipes[0]", "is itself a bench spec"]),
    ("bench: {name: 'a b', recipes: [mini.yaml]}\n", ["bench.name"]),
    ("bench: {name: b, recipes: [mini.yaml], mode: zip}\n", ["bench: must be a mapping with keys name and recipes"]),
    ("name: b\nbench: {name: b, recipes: [mini.yaml]}\n", ["holds only bench:", "'name'"]),
])
def test_bad_bench_files_name_the_file_and_entry(tmp_path, bench, needles):
    write(tmp_path, "", "mini.yaml")
    write(tmp_path, "sweep: {stages.quantize.bits: [8, 4]}\n", "swept.yaml")
    (tmp_path / "bench.yaml").write_text(bench)
    refused(tmp_path / "bench.yaml", *needles)


# ---------------------------------------------------------------- stage sharing


def variants_of(tmp_path: Path, sweep: str) -> list[Variant]:
    return load_sweep(write(tmp_path, sweep))[1]


def test_variants_differing_in_the_last_stage_share_the_stages_before_it(tmp_path):
    variants = variants_of(tmp_path, "sweep: {stages.quantize.bits: [8, 4]}\n")
    assert shared_prefix(variants) == {"bits=8": 2, "bits=4": 2}


def test_variants_differing_in_the_first_stage_share_nothing(tmp_path):
    variants = variants_of(tmp_path, "sweep: {stages.finetune.epochs: [1, 2]}\n")
    assert shared_prefix(variants) == {"epochs=1": 0, "epochs=2": 0}


def test_variants_differing_in_training_defaults_share_nothing(tmp_path):
    variants = variants_of(tmp_path, "sweep: {train.lr: [5.0e-5, 1.0e-4]}\n")
    assert shared_prefix(variants) == {"lr=5e-05": 0, "lr=0.0001": 0}


def test_each_variant_counts_its_longest_shared_prefix(tmp_path):
    variants = variants_of(tmp_path, "sweep: {stages.distill.temperature: [2.0, 4.0], stages.quantize.bits: [8, 4]}\n")
    # Same temperature: finetune and distill shared; other temperature: only finetune.
    assert shared_prefix(variants) == {v.name: 2 for v in variants}
    by_name = {v.name: v.config for v in variants}
    assert common_stages(by_name["temperature=2.0,bits=8"], by_name["temperature=4.0,bits=8"]) == 1
    assert common_stages(by_name["temperature=2.0,bits=8"], by_name["temperature=2.0,bits=8"]) == 3
    assert shared_prefix(variants[:1]) == {"temperature=2.0,bits=8": 0}
