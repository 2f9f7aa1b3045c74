"""Row-wise INT8/INT4 word embeddings, and the tied LM head sharing their packed tensors."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import dequantize
from slimtune.compress.quant.embedding import QuantEmbedding, quantize_embedding_
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme

from tests.compress.models import bert, llama


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(reference.pow(2).sum() / (reference - approx).pow(2).sum())).item()


def random_embedding(v: int = 50, h: int = 33, padding_idx: int | None = None, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    embedding = nn.Embedding(v, h, padding_idx=padding_idx)
    with torch.no_grad():
        embedding.weight.mul_(torch.rand(v, 1) * 3)  # rows of different ranges
    return embedding


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("h", [32, 33])
def test_quantize_dequantize_error_is_within_half_a_step_per_row(bits, h):
    embedding = random_embedding(h=h)
    quant = QuantEmbedding.from_embedding(embedding, bits)
    packed_h = (h + 1) // 2 if bits == 4 else h
    assert quant.qweight.shape == (50, packed_h) and quant.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert quant.scales.shape == (50, 1) and quant.scales.dtype == torch.float32
    w = embedding.weight.detach()  # (V, H)
    error = (quant.dequantized_weight() - w).abs()  # (V, H)
    assert (error <= quant.scales / 2 + 1e-6).all()
    assert sqnr_db(w, quant.dequantized_weight()) > (15 if bits == 4 else 38)
    # 4 bits: the full symmetric grid, codes -8..7 around the implicit zero point 8 (scale 2 max / 15)
    assert torch.equal(quant.scales.squeeze(1), w.abs().amax(1) * 2 / 15 if bits == 4 else w.abs().amax(1) / 127)


@pytest.mark.parametrize("bits", [4, 8])
def test_format_is_that_of_a_per_channel_quant_linear_over_the_table(bits):
    embedding = random_embedding(h=33)
    quant = QuantEmbedding.from_embedding(embedding, bits)
    linear = nn.Linear(33, 50, bias=False)
    linear.weight = embedding.weight
    reference = QuantLinear.from_linear(linear, QuantScheme(bits, None, True))
    assert torch.equal(quant.qweight, reference.qweight) and torch.equal(quant.scales, reference.scales)
    assert torch.equal(quant.dequantized_weight(), dequantize(reference.qweight, reference.scales, None, bits, 33, 33))


@pytest.mark.parametrize("bits", [4, 8])
def test_lookup_returns_rows_of_the_dequantized_table(bits):
    quant = QuantEmbedding.from_embedding(random_embedding(h=33), bits)
    ids = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
    out = quant(ids)
    assert out.shape == (3, 7, 33) and out.dtype == torch.float32
    assert torch.equal(out, quant.dequantized_weight()[ids])


def test_output_dtype_follows_the_float_table():
    embedding = random_embedding().to(torch.bfloat16)
    quant = QuantEmbedding.from_embedding(embedding, 8)
    assert quant.config()["dtype"] == "bfloat16"
    ids = torch.tensor([[1, 2, 3]])
    out = quant(ids)
    assert out.dtype == torch.bfloat16 and torch.equal(out, quant.dequantized_weight()[ids].to(torch.bfloat16))


@pytest.mark.parametrize("bits", [4, 8])
def test_padding_row_stays_zero_and_the_config_rebuilds_the_module(bits):
    quant = QuantEmbedding.from_embedding(random_embedding(padding_idx=3), bits)
    assert quant.padding_idx == 3
    assert torch.equal(quant(torch.tensor([3])), torch.zeros(1, 33))
    rebuilt = QuantEmbedding.from_config(quant.config())
    rebuilt.load_state_dict(quant.state_dict())
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(2))
    assert rebuilt.padding_idx == 3 and torch.equal(rebuilt(ids), quant(ids))


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_llama_shares_the_packed_tensors_with_its_head(bits):
    model = llama(layers=2, tie_word_embeddings=True)
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids).logits
        assert quantize_embedding_(model, bits) == "model.embed_tokens"
        out = model(ids).logits
    embedding, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embedding, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.qweight is embedding.qweight and head.scales is embedding.scales
    assert torch.equal(head.dequantized_weight(), embedding.dequantized_weight())
    assert sqnr_db(reference, out) > (15 if bits == 4 else 38)
    assert model.config.tie_word_embeddings is False
    model.tie_weights()  # transformers' own tying must neither crash nor undo the sharing
    assert model.lm_head is head and head.qweight is embedding.qweight
    with torch.no_grad():
        assert torch.equal(model(ids).logits, out)


def test_untied_head_and_encoder_models_swap_the_embedding_only():
    model = llama(layers=1)
    head = model.lm_head
    assert quantize_embedding_(model, 4) == "model.embed_tokens"
    assert model.lm_head is head and isinstance(head, nn.Linear)

    classifier = bert(layers=1)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = classifier(ids).logits
        assert quantize_embedding_(classifier, 8) == "bert.embeddings.word_embeddings"
        assert sqnr_db(reference, classifier(ids).logits) > 38


def test_bad_input_raises():
    model = llama(layers=1)
    with pytest.raises(SlimTuneError, match="bits=3"):
        quantize_embedding_(model, 3)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    quantize_embedding_(model, 8)
    with pytest.raises(SlimTuneError, match="model.embed_tokens: the word embedding is already quantized"):
        quantize_embedding_(model, 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_artifact_round_trips_bit_exactly_and_stays_shared(bits, tiny_bert, tmp_path):
    import slimtune
    from slimtune.artifact import Artifact
    from slimtune.recipe import TaskConfig
    from slimtune.compress.quant.stage import module_swaps
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    model = llama(layers=2, vocab=len(tokenizer), tie_word_embeddings=True)
    quantize_embedding_(model, bits)
    art = Artifact(model=model, tokenizer=tokenizer, task=TaskConfig(kind="causal-lm", data="x.csv", text="t"))
    art.swaps = module_swaps(model)
    art.save(tmp_path / "q")

    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert "model.embed_tokens.qweight" in state and "lm_head.qweight" not in state  # stored once
    loaded = slimtune.load(tmp_path / "q").model
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding) and isinstance(loaded.lm_head, QuantLinear)
    assert loaded.lm_head.qweight is loaded.model.embed_tokens.qweight
    assert loaded.lm_head.scales is loaded.model.embed_tokens.scales
    ids = torch.randint(0, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_onnx_export_traces_the_lookup_without_a_custom_op(tmp_path):
    import onnxruntime as ort

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.int4 = QuantEmbedding.from_embedding(random_embedding(h=33, seed=1), 4)
            self.int8 = QuantEmbedding.from_embedding(random_embedding(h=33, seed=2), 8)

        def forward(self, ids):
            return torch.cat([self.int4(ids), self.int8(ids)], dim=-1)

    module = Both().eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(6))
    program = torch.onnx.export(module, (ids,), dynamo=True, dynamic_shapes=({0: "batch", 1: "seq"},), verbose=False)
    program.save(str(tmp_path / "emb.onnx"))
    assert all(node.domain in ("", "ai.onnx") for node in program.model_proto.graph.node)
    session = ort.InferenceSession(str(tmp_path / "emb.onnx"), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(7))  # other shape than traced
    out = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    assert torch.equal(torch.from_numpy(out), module(other))


@pytest.mark.parametrize("make, embedding_name", [(lambda: llama(layers=2, tie_word_embeddings=True), "model.embed_tokens"),
                                                   (lambda: bert(layers=2), "bert.embeddings.word_embeddings")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_dtype_casts_change_the_compute_dtype_not_the_format(make, embedding_name, dtype):
    """``model.to(torch.bfloat16)`` / ``.half()`` of a quantized model runs in that dtype (the embedding's output
    follows, so LayerNorm/RMSNorm see what they expect); ``scales`` stay float32 and tied tensors stay shared."""
    from slimtune.compress import quantize_

    model = make()
    ids = torch.randint(0, 40, (2, 11), generator=torch.Generator().manual_seed(5))
    quantize_(model, bits=4, group_size=32, embeddings=8)
    with torch.no_grad():
        reference = model(ids).logits
        model.to(dtype)
        packed = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
        assert len(packed) > 2 and all(m.scales.dtype == torch.float32 for m in packed)
        assert model.get_submodule(embedding_name).dtype == dtype
        out = model(ids).logits
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference, atol=0.05 * reference.abs().max().item(), rtol=0)
        if isinstance(model.lm_head if hasattr(model, "lm_head") else None, QuantLinear):
            assert model.lm_head.scales is model.model.embed_tokens.scales
        model.float()
        assert model.get_submodule(embedding_name).dtype == torch.float32 and model(ids).logits.dtype == torch.float32


def test_device_moves_keep_the_tied_head_sharing_the_embeddings_packed_tensors():
    """torch re-creates each module's buffers on a move; the head and the embedding must still share one copy."""
    from slimtune.compress import quantize_
    from slimtune.compress.quant.linear import PackedModule

    model = llama(layers=1, tie_word_embeddings=True)
    quantize_(model, bits=4, group_size=32, embeddings=8)
    embedding, head = model.model.embed_tokens, model.lm_head
    old = embedding.qweight
    model.to(torch.bfloat16).to("meta")  # a real device move (new tensors), the same code path as .cuda()
    assert embedding.qweight is not old and embedding.qweight.device.type == "meta"
    assert head.qweight is embedding.qweight and head.scales is embedding.scales and head.scales.dtype == torch.float32
    blocks = [m for m in model.model.layers.modules() if isinstance(m, QuantLinear)]
    assert blocks and all(m.qweight.device.type == "meta" for m in blocks)
    assert len(PackedModule._moved) == 0  # nothing is kept once the call returns
