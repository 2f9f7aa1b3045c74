import pytest

from slimtune.errors import RecipeError
from slimtune.recipe import apply_override, load_recipe, parse_set, shipped_recipes


def test_good_recipe_fills_defaults(write_recipe):
    recipe = load_recipe(write_recipe("- finetune: {epochs: 2}\n- evaluate: {latency: false}\n"))
    assert [s.name for s in recipe.stages] == ["finetune", "evaluate"]
    assert recipe.stages[0].config.epochs == 2
    assert recipe.stages[1].config.split == "test"  # default filled in
    assert recipe.train.grad_accum == 1
    assert recipe.resolved()["stages"][1]["evaluate"]["latency"] is False


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_shipped_recipes_validate(name):
    assert load_recipe(name).name == name


def test_unknown_key_names_key_line_and_allowed(write_recipe):
    path = write_recipe("- finetune: {epochs: 1}\n", extra="trian: {lr: 1}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "unknown key 'trian'" in msg and f"{path}:6" in msg
    assert "allowed keys:" in msg and "train" in msg and "stages" in msg


def test_unknown_key_inside_block_lists_that_blocks_keys(write_recipe):
    path = write_recipe("- finetune: {epochs: 1}\n", extra="distributed: {strategy: single, procs: 2}\n")
    with pytest.raises(RecipeError, match=r"(?s)unknown key 'distributed.procs'.*allowed keys: strategy, nproc"):
        load_recipe(path)


def test_wrong_type_names_key_and_value(write_recipe):
    path = write_recipe("- finetune: {epochs: many}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "stages.0.finetune.epochs" in str(err.value) and "'many'" in str(err.value)
    assert f"{path}:7" in str(err.value)


def test_unknown_stage_lists_available(write_recipe):
    with pytest.raises(RecipeError, match=r"(?s)unknown stage 'fintune'.*evaluate, export, finetune"):
        load_recipe(write_recipe("- fintune: {epochs: 1}\n"))


def test_unknown_stage_option_lists_allowed(write_recipe):
    with pytest.raises(RecipeError, match=r"(?s)unknown key 'stages.0.export.fmt'.*allowed keys: format, opset"):
        load_recipe(write_recipe("- export: {fmt: onnx}\n"))


def test_literal_lists_allowed_values(write_recipe):
    with pytest.raises(RecipeError, match="'fp32', 'bf16' or 'fp16'"):
        load_recipe(write_recipe("- finetune: {}\n"), overrides={"train.precision": "fp8"})


def test_overrides_apply_and_validate(write_recipe):
    path = write_recipe("- finetune: {epochs: 1}\n- evaluate: {}\n")
    recipe = load_recipe(path, parse_set(["train.lr=3e-5", "stages.finetune.epochs=3", "stages.1.split=validation"]))
    assert recipe.train.lr == 3e-5 and recipe.stages[0].config.epochs == 3
    assert recipe.stages[1].config.split == "validation"
    with pytest.raises(RecipeError, match="from --set"):
        load_recipe(path, parse_set(["train.batch_size=-1"]))
    with pytest.raises(RecipeError, match="stage 'prune' is not in the recipe"):
        load_recipe(path, parse_set(["stages.prune.heads=0.5"]))
    with pytest.raises(RecipeError, match="has no '='"):
        parse_set(["train.lr"])


def test_override_of_repeated_stage_needs_index():
    raw = {"stages": [{"evaluate": {}}, {"evaluate": None}]}
    with pytest.raises(RecipeError, match="more than once"):
        apply_override(raw, "stages.evaluate.split", "test")
    apply_override(raw, "stages.1.split", "validation")
    assert raw["stages"][1] == {"evaluate": {"split": "validation"}}


def test_malformed_yaml_and_missing_recipe(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="did you mean 'minilm-sentiment'"):
        load_recipe("minilm-sentimnt")


@pytest.mark.parametrize("distributed,message", [
    ("{strategy: single, nproc: 2}", "strategy 'single' runs one process"),
    ("{strategy: pipeline, nproc: 1}", "needs at least 2 processes"),
    ("{strategy: zero, nproc: 2}", "'single', 'ddp', 'fsdp' or 'pipeline'"),
    ("{strategy: ddp, nproc: 0}", "distributed.nproc"),
])
def test_inconsistent_distributed_block_is_rejected(write_recipe, distributed, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe("- finetune: {epochs: 1}\n", extra=f"distributed: {distributed}\n"))


def test_colon_numbers_stay_strings_in_files_and_overrides(write_recipe):
    # Plain YAML 1.1 reads 2:4 as the base-60 number 124; N:M sparsity patterns must survive.
    recipe = load_recipe(write_recipe("- prune: {method: magnitude, pattern: 2:4}\n"), {"train.lr": "3e-5"})
    assert recipe.stages[0].config.pattern == "2:4" and recipe.train.lr == 3e-5
    again = load_recipe(write_recipe("- prune: {method: magnitude, pattern: 2:4}\n"), parse_set(["stages.prune.pattern=4:8"]))
    assert again.stages[0].config.pattern == "4:8"


def test_the_recipe_loader_leaves_plain_yaml_alone():
    import yaml

    assert yaml.safe_load("2:4") == 124 and yaml.safe_dump({"n": 1}) == "n: 1\n"
