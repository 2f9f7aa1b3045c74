"""ONNX export of LoRA models, validated in ONNX Runtime by the export stage itself.

Each recipe ends with ``- export: {max_examples: 8}``: the stage runs PyTorch and ONNX Runtime on the same test
examples and fails when their outputs differ by more than its ``atol`` (1e-3, its default); the tests assert
the recorded ``max_abs_diff`` against that same bound and check the graph's shape: a merged LoRA leaves no
low-rank tensors in it; an unmerged one keeps its branch (two float MatMuls per adapted layer, on the A and B
initializers) beside the base's own op: ``MatMul`` (float), ``com.microsoft::MatMulNBits`` (INT4) or
``DequantizeLinear`` + ``MatMul`` (weight-only INT8).
"""

from __future__ import annotations

import collections

import onnx
import pytest
from onnx import numpy_helper

import slimtune
from tests.conftest import recipe_text

ATOL = 1e-3  # the export stage's default atol, which its own validation enforces
RANK = 4
LORA = f"lora: {{rank: {RANK}, targets: [query, value], max_steps: 2, lr: 0.05, eval_split: none"
ADAPTED = 2 * 2  # query and value in each of the tiny BERT's 2 layers
BLOCK_LINEARS = 2 * 6  # q, k, v, attention output, intermediate, output in each of the 2 layers
FINETUNE = "- finetune: {max_steps: 2, eval_split: none}\n"
EXPORT = "- export: {max_examples: 8}\n"


def _export(run) -> onnx.GraphProto:
    stage = run.stages[-1]
    assert stage.metrics["max_abs_diff"] <= ATOL
    return onnx.load(stage.path / "model.onnx").graph


def _run(tmp_path, write_recipe, stages: str):
    run = slimtune.run(write_recipe(FINETUNE + stages + EXPORT), out=tmp_path / "run")
    return _export(run), run


def _ops(graph) -> collections.Counter:
    return collections.Counter((node.domain or "ai.onnx", node.op_type) for node in graph.node)


def _low_rank(graph) -> set[str]:
    """Initializers shaped like a LoRA factor, ``(RANK, in)`` or ``(out, RANK)`` (no other tensor of these models has a side of 4)."""
    return {init.name for init in graph.initializer if len(init.dims) == 2 and RANK in init.dims}


def _branch_matmuls(graph) -> list:
    low_rank = _low_rank(graph)
    return [n for n in graph.node if n.op_type == "MatMul" and set(n.input) & low_rank]


@pytest.mark.parametrize("dora", [False, True])
def test_float_lora_unmerged_exports_with_its_branch(tmp_path, write_recipe, dora):
    graph, run = _run(tmp_path, write_recipe, f"- {LORA}, dora: {str(dora).lower()}}}\n")
    assert run.stages[1].metrics["adapted_modules"] == ADAPTED
    assert len(_low_rank(graph)) == 2 * ADAPTED  # A and B of each adapted layer
    assert len(_branch_matmuls(graph)) == 2 * ADAPTED  # x A^T, then (x A^T) B^T


def test_merged_lora_exports_as_a_dense_model(tmp_path, write_recipe):
    graph, run = _run(tmp_path, write_recipe, f"- {LORA}, merge: true}}\n")
    assert run.stages[1].metrics["merge"]["layers"] == ADAPTED
    assert not [i.name for i in graph.initializer if "lora" in i.name.lower()]
    assert not _low_rank(graph) and not _branch_matmuls(graph)
    # The backbone's own products only: one per block linear and two per attention (QK^T, PV) in each layer.
    assert _ops(graph)[("ai.onnx", "MatMul")] == BLOCK_LINEARS + 2 * 2


def test_unmerged_lora_over_int4_exports_matmulnbits_and_the_low_rank_branch(tmp_path, write_recipe):
    graph, _ = _run(tmp_path, write_recipe, f"- quantize: {{bits: 4, group_size: 32}}\n- {LORA}}}\n")
    assert _ops(graph)[("com.microsoft", "MatMulNBits")] == BLOCK_LINEARS  # the base stays packed
    assert len(_low_rank(graph)) == 2 * ADAPTED
    assert len(_branch_matmuls(graph)) == 2 * ADAPTED


def test_merged_lora_over_int4_exports_as_a_quantized_model(tmp_path, write_recipe):
    graph, run = _run(tmp_path, write_recipe, f"- quantize: {{bits: 4, group_size: 32}}\n- {LORA}, merge: true}}\n")
    assert run.stages[2].metrics["merge"]["requantized"] == ADAPTED
    assert _ops(graph)[("com.microsoft", "MatMulNBits")] == BLOCK_LINEARS
    assert not _low_rank(graph)


def test_lora_over_int8_exports(tmp_path, write_recipe):
    graph, _ = _run(tmp_path, write_recipe, f"- quantize: {{bits: 8}}\n- {LORA}}}\n")
    assert _ops(graph)[("ai.onnx", "DequantizeLinear")] == BLOCK_LINEARS
    assert len(_branch_matmuls(graph)) == 2 * ADAPTED


def test_qlora_on_a_causal_lm_exports(tmp_path, tiny_llama, tiny_csv):
    """The smollm2-qlora shape on the tiny Llama: INT4 base, LoRA on every block linear, causal-LM logits."""
    recipe = tmp_path / "qlora.yaml"
    lora = f"- lora: {{rank: {RANK}, targets: [all-linear], max_steps: 2, lr: 0.01, eval_split: none}}\n"
    recipe.write_text(recipe_text(tiny_llama, tiny_csv, "- quantize: {bits: 4, group_size: 32}\n" + lora + EXPORT, kind="causal-lm"))
    graph = _export(slimtune.run(recipe, out=tmp_path / "run"))
    linears = 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert _ops(graph)[("com.microsoft", "MatMulNBits")] == linears
    assert len(_branch_matmuls(graph)) == 2 * linears
