"""ONNX export of quantized models: INT4 as com.microsoft::MatMulNBits, weight-only INT8 as
DequantizeLinear + MatMul, W8A8 as MatMulInteger, quantized word embeddings as Gather over
packed rows — each run in ONNX Runtime against PyTorch, and stored packed in the file."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from slimtune.artifact import Artifact
from slimtune.export import export_onnx, ort_session, validate_onnx
from slimtune.recipe import TaskConfig
from slimtune.registry import ONNX_LOWERINGS
from slimtune.tasks import Collator
from slimtune.compress.kernels import reference
from slimtune.compress.quant import onnx as quant_onnx  # noqa: F401 - registers the lowerings
from slimtune.compress.quant.embedding import QuantEmbedding, quantize_embedding_, tied_head
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.onnx import matmul_nbits_operands, nbits_block_size
from slimtune.compress.quant.rtn import QuantScheme, quantize_rtn

from tests.compress import models
from tests.conftest import tiny_texts

INT4_G32, INT4_G32_ASYM = QuantScheme(4, 32, True), QuantScheme(4, 32, False)
INT4_CHANNEL, INT4_CHANNEL_ASYM = QuantScheme(4, None, True), QuantScheme(4, None, False)
INT8 = QuantScheme(8, None, True)


# -- the MatMulNBits layout, checked in ONNX Runtime without the exporter ----------------


def matmul_nbits_model(b, scales, zero_points, n: int, k: int, block: int) -> bytes:
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points is not None:
        inits.append(numpy_helper.from_array(zero_points, "zero_points"))
    node = helper.make_node("MatMulNBits", ["A"] + [i.name for i in inits], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


@pytest.mark.parametrize("k, scheme", [(64, INT4_G32), (96, INT4_G32_ASYM), (48, INT4_CHANNEL),
                                       (40, INT4_CHANNEL_ASYM), (33, INT4_CHANNEL)],
                         ids=["g32", "g32-asym-odd-blocks", "channel-block16", "channel-asym-padded", "channel-odd-k"])
def test_matmul_nbits_operands_compute_the_reference(k, scheme, tmp_path):
    torch.manual_seed(k)
    n = 24
    packed = quantize_rtn(torch.randn(n, k), scheme)
    group_size = scheme.groups_of(k)
    b, scales, zero_points = matmul_nbits_operands(*(None if t is None else t.numpy() for t in packed.values()), group_size, k)
    block = nbits_block_size(group_size, k)
    k_blocks = -(-k // block)
    assert block >= 16 and block & (block - 1) == 0 and b.shape == (n, k_blocks, block // 2)
    codes = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, -1)  # (N, k_blocks * block)
    zeros = np.full((n, k_blocks), 8) if zero_points is None else np.stack([zero_points & 0xF, zero_points >> 4], -1).reshape(n, -1)
    assert (codes[:, k:] == zeros[:, k_blocks - 1:k_blocks]).all()  # padding dequantizes to 0, whatever the runtime does
    (tmp_path / "m.onnx").write_bytes(matmul_nbits_model(b, scales, zero_points, n, k, block))
    session = ort_session(tmp_path / "m.onnx")
    for m in (1, 5):
        x = torch.randn(m, k)
        ref = reference.dequant_matmul(x, packed["qweight"], packed["scales"], packed["zeros"], 4, group_size, k)
        out = session.run(None, {"A": x.numpy()})[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("k, group_size", [(80, 32), (33, None), (128, 64)], ids=["g32-short-last", "channel-padded", "g64"])
def test_matmul_nbits_float_zero_points_compute_the_reference(k, group_size, tmp_path):
    """Format v2's float32 zero points (an exact QA-LoRA merge) go to MatMulNBits unpacked in A's type, and ONNX
    Runtime dequantizes them as (code - zero) * scale, padded blocks included. Bound on |ORT - reference|: ORT's
    float32 result is within gamma_{K+3} |x| ((|c| + |z|) s) of y* = x W^T however it forms each weight ((c - z) s,
    or c s - z s: at most three roundings) and sums K products; the reference within gamma_{K+2} |x| |W|."""
    n, gamma = 24, lambda m: m * 2.0**-24 / (1 - m * 2.0**-24)
    g = torch.Generator().manual_seed(k)
    group = group_size or k
    groups = -(-k // group)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales, zeros = torch.rand(n, groups, generator=g) * 0.02 + 1e-3, torch.rand(n, groups, generator=g) * 24 - 4
    qweight = reference.pack_int4(codes)
    b, s, zp = matmul_nbits_operands(qweight.numpy(), scales.numpy(), zeros.numpy(), group, k)
    block = nbits_block_size(group, k)
    assert zp.dtype == np.float32 and zp.shape == s.shape == (n, -(-k // block))
    (tmp_path / "m.onnx").write_bytes(matmul_nbits_model(b, s, zp, n, k, block))
    session = ort_session(tmp_path / "m.onnx")
    expand = lambda t: t.double().repeat_interleave(group, dim=1)[:, :k]  # noqa: E731
    w = (codes.double() - expand(zeros)) * expand(scales)  # (N, K), exact
    for m in (1, 5):
        x = torch.randn(m, k, generator=g)
        ref = reference.dequant_matmul(x, qweight, scales, zeros, 4, group, k)
        out = session.run(None, {"A": x.numpy()})[0]
        xa = x.double().abs()
        bound = gamma(k + 3) * (xa @ ((codes.double() + expand(zeros).abs()) * expand(scales)).t()) + gamma(k + 2) * (xa @ w.abs().t())
        assert (torch.from_numpy(out).double() - ref.double()).abs().le(bound).all()


# -- the lowerings through torch.onnx.export, on awkward shapes ---------------------------


class TinyTiedLM(nn.Module):
    """INT4 and INT8 word embeddings with LM heads tied to them (the heads' packed tensors are the
    embeddings': 600 x 48 codes, over the optimiser's folding limit, so the file must keep one copy),
    and a body of W8A8 (first, so its per-token rounding sees bit-identical inputs in both runtimes),
    INT4 per channel over an odd K (padded block), and weight-only INT8."""

    def __init__(self, vocab: int = 600, hidden: int = 48):
        super().__init__()
        self.embed4 = QuantEmbedding.from_embedding(nn.Embedding(vocab, hidden), 4)
        self.embed8 = QuantEmbedding.from_embedding(nn.Embedding(vocab, hidden), 8)
        self.body = nn.Sequential(
            QuantLinear.from_linear(nn.Linear(hidden, 33), INT8, act_bits=8),
            QuantLinear.from_linear(nn.Linear(33, 40), INT4_CHANNEL_ASYM),
            QuantLinear.from_linear(nn.Linear(40, hidden, bias=False), INT8),
        )
        self.head4 = tied_head(self.embed4, nn.Linear(hidden, vocab, bias=False))  # per channel, K=48: block 16
        self.head8 = tied_head(self.embed8, nn.Linear(hidden, vocab, bias=False))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.body(self.embed4(ids) + self.embed8(ids))  # (B, T, H)
        return torch.cat([self.head4(h), self.head8(h)], dim=-1)  # (B, T, 2V)


def test_lowerings_match_pytorch_on_awkward_shapes_and_tied_tables(tmp_path):
    torch.manual_seed(0)
    lm = TinyTiedLM().eval()
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    program = torch.onnx.export(lm, (torch.randint(0, 600, (2, 5)),), dynamo=True, dynamic_shapes=({0: batch, 1: seq},),
                                custom_translation_table=dict(ONNX_LOWERINGS), optimize=True, verbose=False)
    path = tmp_path / "lm.onnx"
    program.save(str(path))
    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert ops["MatMulInteger"] == 1 and ops["MatMulNBits"] == 2 and ops["DequantizeLinear"] == 2, ops
    # Each table once, shared with its head; the heads' scales are copied in their ONNX layouts:
    # per block for MatMulNBits ((V, 48 / 16) floats), flat for DequantizeLinear ((V,) floats).
    assert initializer_bytes(path) <= tensor_bytes(lm) + 4 * (600 * 3 + 600) + 1024
    session = ort_session(path)
    for shape in [(1, 1), (3, 7)]:
        ids = torch.randint(0, 600, shape)
        with torch.no_grad():
            ref = lm(ids)
        out = session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-5 * ref.abs().max().item(), rtol=0)


# -- whole models through slimtune.export -------------------------------------------------


def quantize_linears_(model: nn.Module, rule) -> int:
    """Swap each ``nn.Linear`` that ``rule(name)`` gives ``(scheme, act_bits)`` for; returns how many."""
    chosen = [(name, module, rule(name)) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    chosen = [(name, module, r) for name, module, r in chosen if r is not None]
    for name, linear, (scheme, act_bits) in chosen:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear.from_linear(linear, scheme, act_bits))
    return len(chosen)


def bert_rule(name: str):
    """Layer 0 INT4 g32 symmetric, layer 1 g32 asymmetric, layer 2 per channel; pooler and classifier float."""
    for layer, scheme in enumerate([INT4_G32, INT4_G32_ASYM, INT4_CHANNEL_ASYM]):
        if f"encoder.layer.{layer}." in name:
            return scheme, None
    return None


def llama_rule(name: str):
    """Attention projections weight-only INT8, the MLP W8A8; the (tied) LM head is the embedding's business."""
    if ".self_attn." in name:
        return INT8, None
    if ".mlp." in name:
        return INT8, 8
    return None


def tensor_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def initializer_bytes(path) -> int:
    return sum(numpy_helper.to_array(init).nbytes for init in onnx.load(path).graph.initializer)


CASES = {
    # kind, model, quantize, embedding bits, expected op counts
    "bert-int4": ("classification", lambda v: models.bert(layers=3, vocab=v), bert_rule, 4, {"MatMulNBits": 18}),
    "llama-int8-w8a8": ("causal-lm", lambda v: models.llama(layers=2, vocab=v, tie_word_embeddings=True), llama_rule, 8,
                        {"DequantizeLinear": 9, "MatMulInteger": 6}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_quantized_model_exports_packed_and_matches_pytorch(case, tiny_bert, tiny_csv, tmp_path):
    """INT4 g32 (symmetric, asymmetric) and per-channel layers + an INT4 word embedding (BERT);
    weight-only INT8 + W8A8 layers + an INT8 word embedding tied to the LM head (Llama)."""
    from transformers import AutoTokenizer

    kind, build, rule, embedding_bits, expected_ops = CASES[case]
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    model = build(len(tok))
    float_bytes = tensor_bytes(model)
    assert quantize_linears_(model, rule) > 0
    quantize_embedding_(model, embedding_bits)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    task = TaskConfig(kind=kind, data=str(tiny_csv), text="review", label="sentiment", max_length=16)
    art = Artifact(model=model.eval(), tokenizer=tok, task=task, labels=[0, 1] if kind == "classification" else None)

    path = export_onnx(art, tmp_path / "model.onnx")

    ops = collections.Counter(node.op_type for node in onnx.load(path).graph.node)
    assert all(ops[op] == count for op, count in expected_ops.items()), ops
    stored = initializer_bytes(path)
    assert stored <= tensor_bytes(model) + 2048  # the packed tensors, not dequantized copies
    assert stored < 0.45 * float_bytes
    collate = Collator(tok, 16, kind)
    batches = [collate([{"text": t, "label": y} for t, y in tiny_texts(n, seed=n)]) for n in (1, 9)]
    report = validate_onnx(art, path, batches)
    with torch.no_grad():
        scale = art.model(**{k: v for k, v in batches[1].items() if k != "labels"}).logits.abs().max().item()
    assert report["max_abs_diff"] < 1e-4 * scale, report
    assert report["prediction_agreement"] == 1.0, report
