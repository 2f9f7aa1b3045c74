"""Every ordered pair of model-changing stages either runs and gives a right model, or is refused up front.

For each pair (A, B) on a 4-layer tiny BERT (classification) and a 4-layer
tiny Llama (causal LM), both fine-tuned once for the whole module, the recipe
``[A, B, export]`` is run. The expectations below are written by hand from
what each stage does (they are not read from the stages' ``compose``), and
README's table of supported orders must equal them:

* refused pairs: the recipe fails validation, ``slimtune run`` exits 2, the
  error names the cause, and nothing is written;
* allowed pairs: B did what it promises (every targeted linear quantized,
  the sparsity or N:M pattern measured, the sharing tied, layers removed),
  every compression record A left still describes the model (or a warning
  said it was changed or dropped), and the artifact on disk reloads bit for
  bit as the stage held it in memory.

Stage A is computed once per model and reused (the runner's resume) while B
varies, so the whole matrix costs one short run per pair. The ONNX export
(with its parity check against PyTorch) costs seconds per model, so it runs
on every second stage after ``finetune`` on the BERT (one float one) and on the pairs whose
first stage changes the structure (sharing, structured pruning, N:M masks)
on the Llama (:data:`EXPORTED`).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import slimtune
from slimtune.artifact import Artifact, bare, load
from slimtune.cli import main
from slimtune import arch
from slimtune.compress.invariants import holds_pattern, weight_of
from slimtune.compress.share import sharing_intact
from slimtune.delta import LoraLinear
from slimtune.errors import RecipeError
from slimtune.recipe import load_recipe
from tests.conftest import recipe_text, write_bert, write_llama

STAGES = {
    "finetune": "finetune: {max_steps: 2, eval_split: none}",
    "distill": "distill: {student: {layers: [0, 1]}, max_steps: 2, eval_split: none}",
    "magnitude": "prune: {method: magnitude, sparsity: 0.5}",
    "wanda 2:4": "prune: {method: wanda, pattern: '2:4', calibration: {batches: 1}}",
    "structured": "prune: {method: structured, heads: 0.5, ffn: 0.5, importance: weight}",
    "drop layer": "prune: {method: structured, layers: 1, importance: activation, calibration: {batches: 1}}",
    "share": "share: {every: 2}",
    "rtn int4": "quantize: {bits: 4, group_size: 32}",
    "rtn int8": "quantize: {bits: 8}",
    "gptq int4": "quantize: {method: gptq, bits: 4, group_size: 32, calibration: {batches: 1}}",
    "awq int4": "quantize: {method: awq, bits: 4, group_size: 32, calibration: {batches: 1}}",
    "qat int4": "quantize: {bits: 4, group_size: 32, qat: {epochs: 1, max_steps: 2}}",
    "lora": "lora: {rank: 2, targets: [all-linear], max_steps: 2, eval_split: none}",
}
QUANTIZE = ("rtn int4", "rtn int8", "gptq int4", "awq int4", "qat int4")
PRUNE = ("magnitude", "wanda 2:4", "structured", "drop layer")
STRUCTURED = ("structured", "drop layer")


def refusal(first: str, second: str) -> str | None:
    """Why ``first`` then ``second`` is refused at validation (a phrase the error must contain), or None."""
    if first == "lora":  # the delta is bound to its backbone: nothing may change it afterwards
        return "already attached one of that name" if second == "lora" else "would change the backbone"
    if first in QUANTIZE and second != "lora":
        if second in QUANTIZE:
            return "already quantized"
        if second in PRUNE:
            return "needs float linears"
        if second == "share":
            return "averages float weights"
        if second == "distill":
            return "builds its student from the teacher's layers"
    if first == "share":
        if second in ("gptq int4", "awq int4"):
            return "calibrates each layer's own weights"
        if second in STRUCTURED:
            return "made layers share their weights"
    if first == "structured" and second == "share":
        return "needs layers of one shape"
    return None


PAIRS = [(a, b) for a in STAGES for b in STAGES]
MODELS = ["bert", "llama"]
# Float results of finetune, distill and magnitude export as the plain graph wanda 2:4 does (the export tests cover it).
EXPORTED = [("bert", "finetune", b) for b in STAGES if b not in ("finetune", "distill", "magnitude")] + [
    ("llama", "share", "rtn int4"), ("llama", "share", "qat int4"), ("llama", "wanda 2:4", "gptq int4"),
    ("llama", "structured", "awq int4"), ("llama", "drop layer", "share"), ("llama", "distill", "rtn int8")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """The fine-tuned 4-layer tiny BERT and Llama every pair starts from, and the CSV."""
    root = tmp_path_factory.mktemp("composition")
    from tests.conftest import tiny_texts
    import pandas as pd

    data = root / "reviews.csv"
    pd.DataFrame(tiny_texts(96), columns=["review", "sentiment"]).to_csv(data, index=False)
    bert = write_bert(root / "bert", num_layers=4)
    sources = {"bert": bert, "llama": write_llama(root / "llama", bert, num_layers=4)}
    out = {"data": data, "root": root}
    for name, path in sources.items():
        recipe = root / f"train-{name}.yaml"
        recipe.write_text(_recipe(path, data, name, ["finetune: {max_steps: 4, eval_split: none}"]))
        out[name] = slimtune.run(recipe, out=root / f"trained-{name}").stages[-1].path
    return out


def _recipe(model: Path, data: Path, which: str, stages: list[str]) -> str:
    kind = "classification" if which == "bert" else "causal-lm"
    text = recipe_text(model, data, "".join(f"- {s}\n" for s in stages), kind=kind)
    return text.replace("max_length: 16}", "max_length: 16, limit: {train: 32, validation: 16, test: 16}}")


@pytest.fixture
def held(monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """Each stage directory written -> the state dict its model held in memory then (cloned)."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    write_into = Artifact.write_into

    def spy(self, directory):
        write_into(self, directory)
        seen[Path(directory).name.split(".tmp-")[0].lstrip(".")] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    monkeypatch.setattr(Artifact, "write_into", spy)
    return seen


@pytest.mark.parametrize("which", MODELS)
@pytest.mark.parametrize("first, second", PAIRS, ids=[f"{a}__{b}".replace(" ", "_").replace(":", "of") for a, b in PAIRS])
def test_pair_runs_right_or_is_refused_up_front(trained, held, which, first, second, caplog):
    recipe = _write_pair(trained, which, first, second)
    out = trained["root"] / "runs" / f"{which}-{first}".replace(" ", "_")  # stage A reused across B
    why = refusal(first, second)
    if why is not None:
        with pytest.raises(RecipeError, match=re.escape(why)):
            load_recipe(recipe)
        fresh_out = trained["root"] / "refused" / f"{which}-{first}-{second}".replace(" ", "_")
        assert main(["run", str(recipe), "--out", str(fresh_out), "--quiet"]) == 2
        assert not fresh_out.exists()  # nothing written
        return

    with caplog.at_level(logging.WARNING):
        result = slimtune.run(recipe, out=out)
    before, after = load(result.stages[0].path), load(result.stages[1].path)
    notes = caplog.text
    _check_promise(second, before, after, result.stages[1].path)
    _check_records_hold(after, notes)
    _check_reload_is_exact(after, held)


@pytest.mark.parametrize("which, first, second", EXPORTED, ids=[f"{w}-{a}__{b}".replace(" ", "_").replace(":", "of") for w, a, b in EXPORTED])
def test_composed_model_exports_to_onnx_with_parity(trained, which, first, second):
    """The export stage itself fails when ONNX Runtime's outputs differ from PyTorch's by more than its atol.

    The bound is the export stage's own ``atol`` (1e-3, its default), not a new one. Prediction agreement is
    not asserted: outputs within 1e-3 may still flip an argmax at a near-tie, which no bound excludes.
    """
    recipe = _write_pair(trained, which, first, second, export=True)
    result = slimtune.run(recipe, out=trained["root"] / "runs" / f"{which}-{first}".replace(" ", "_"))
    assert result.stages[2].metrics["max_abs_diff"] <= 1e-3


def _write_pair(trained: dict, which: str, first: str, second: str, export: bool = False) -> Path:
    recipe = trained["root"] / f"{which}-{first}-{second}.yaml".replace(" ", "_")
    stages = [STAGES[first], STAGES[second]] + (["export: {max_examples: 8}"] if export else [])
    recipe.write_text(_recipe(trained[which], trained["data"], which, stages))
    return recipe


def _block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for i, b in enumerate(arch.layers(model)) for n, m in b.named_modules(remove_duplicate=False)
            if isinstance(m, nn.Linear) or hasattr(m, "dequantized_weight")]


def _check_promise(second: str, before: Artifact, after: Artifact, path: Path) -> None:
    model = after.model
    if second == "lora":  # every block linear adapted; the backbone's weight file linked, not rewritten
        adapted = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
        with bare(model):
            assert len(adapted) == len(_block_linears(model))
        assert (path / "model.safetensors").stat().st_ino == (before.path / "model.safetensors").stat().st_ino
        assert [r["name"] for r in after.attachments["deltas"]] == ["lora"]
    elif second in QUANTIZE:
        left = [n for n, m in _block_linears(model) if isinstance(m, nn.Linear)]
        assert not left, f"float linears left in the blocks: {left}"
        record = after.compression["quantize"]
        assert len(record["modules"]) == len(_block_linears(model))
    elif second in ("magnitude", "wanda 2:4"):
        record = after.compression["prune"]
        weights = [weight_of(model, n) for n in record["modules"]]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros == record["zeros"] and zeros / sum(w.numel() for w in weights) >= 0.5 - 1e-6
        if second == "wanda 2:4":
            assert record["pattern"] == "2:4" and all(holds_pattern(w, "2:4") for w in weights)
    elif second in STRUCTURED:
        assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in before.model.parameters())
        if second == "drop layer":
            assert arch.num_layers(model) == arch.num_layers(before.model) - 1
    elif second == "share":
        record = after.compression["share"]
        assert sharing_intact(model, record["groups"]) and record["groups"]
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            stored = set(f.keys())
        members = [i for g in record["groups"] for i in g[1:]]
        prefix = {n for n, m in model.named_modules() if m is arch.layers(model)}.pop()
        assert not [k for k in stored if any(k.startswith(f"{prefix}.{i}.") for i in members)]  # stored once
    elif second == "distill":
        assert arch.num_layers(model) == 2


def _check_records_hold(after: Artifact, notes: str) -> None:
    """Every record the artifact carries describes its model (the backbone, under a delta); a record that was dropped was announced."""
    with bare(after.model):
        _check_records_of(after, notes)


def _check_records_of(after: Artifact, notes: str) -> None:
    model, records = after.model, after.compression
    if "quantize" in records:
        assert all(hasattr(model.get_submodule(n), "dequantized_weight") for n in records["quantize"]["modules"])
    if "share" in records:
        assert sharing_intact(model, records["share"]["groups"])
    if "prune" in records and records["prune"].get("method") != "structured":
        record = records["prune"]
        weights = [weight_of(model, n) for n in record["modules"]]
        assert sum(int((w == 0).sum()) for w in weights) >= record["zeros"]
        if record.get("pattern"):
            assert all(holds_pattern(w, record["pattern"]) for w in weights)
    lineage = {entry["stage"] for entry in after.lineage}
    for key, stage in (("prune", "prune"), ("share", "share"), ("quantize", "quantize")):
        if stage in lineage and key not in records:
            assert "record is dropped" in notes or "undone" in notes, f"the {key} record vanished without a word"


def _check_reload_is_exact(after: Artifact, held: dict) -> None:
    memory = held[after.path.name]
    disk = after.model.state_dict()
    assert memory.keys() == disk.keys()
    for name, tensor in memory.items():
        assert torch.equal(tensor, disk[name]), name


def test_readme_lists_the_supported_orders():
    """README's matrix is this test's expectation table (``ok`` / ``refused``), cell for cell."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    names = list(STAGES)
    header = "| first \\ then | " + " | ".join(names) + " |"
    assert header in readme, f"README lacks the composition table; expected header:\n{header}"
    start = readme.index(header)
    rows = readme[start:].splitlines()[2:2 + len(names)]
    for name, row in zip(names, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == name
        expected = ["refused" if refusal(name, other) else "ok" for other in names]
        assert cells[1:] == expected, f"README row {name!r}: {cells[1:]} != {expected}"
