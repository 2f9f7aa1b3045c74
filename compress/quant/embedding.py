"""Row-wise INT8/INT4 quantization of the word embedding, for size.

Each row of the ``(V, H)`` table is quantized symmetrically with its own
scale (``max|row| / 127`` for 8 bits; the full grid ``2 max|row| / 15`` over
codes -8..7 for 4 bits, see rtn.py), which is exactly the per-output-channel
format of a ``QuantLinear`` over a ``(V, H)`` weight (reference.py, format v1):
``bits=8`` stores int8 codes ``(V, H)``, ``bits=4`` uint8 ``(V, ceil(H/2))``
packed along H (even h in the low nibble, implicit zero point 8), with float32
scales ``(V, 1)``. A lookup gathers the rows of the packed codes, unpacks them
and multiplies by the rows' scales, in plain torch ops, so the ONNX exporter
traces it without a custom op (Gather, bit ops, Cast, Mul).

When the LM head shares the embedding's weight (tied embeddings), the head
becomes a per-channel ``QuantLinear`` whose ``qweight`` and ``scales`` buffers
are the very same tensors as the embedding's, so the table is stored once;
transformers' own tying (of ``weight``) is switched off in the config and the
artifact's ties record the shared buffers instead.

This is the usual row-wise scheme of embedding-table compression (e.g.
``torch.ao``'s ``quantized.Embedding`` with per-row scales; Guan et al. 2019,
"Post-Training 4-bit Quantization on Embedding Tables").

Limits: symmetric, per row only (no groups along H); one outlier in a row
coarsens the whole row (error per element is at most half that row's step,
``scale / 2``). The table is frozen: no gradients reach the codes.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.compress.kernels.reference import dequantize, symmetric_zero, unpack
from slimtune.compress.quant.linear import PackedModule, QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, quantize_rtn


# ---------------------------------------------------------------- tensor function

def lookup_rows(ids: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Dequantized rows of a row-wise quantized table.

    Args:
        ids: integer ``(...)`` row indices.
        qweight: packed codes ``(V, ceil(H/2))`` uint8 (4 bits) or ``(V, H)`` int8 (8 bits).
        scales: float32 ``(V, 1)``.
        dim: H.

    Returns:
        float32 ``(..., H)``.
    """
    flat = ids.reshape(-1)  # (M,)
    rows = qweight.index_select(0, flat)  # (M, ceil(H/2)) or (M, H)
    if bits == 4:
        # Unpack in int32: the ONNX exporter lowers ``>>`` on uint8 to an int8 result, and
        # ONNX Runtime has no int16 ``Where``; int32 nibbles export and run exactly.
        rows = rows.to(torch.int32)
    codes = unpack(rows, bits, dim)  # (M, H) int16
    values = (codes - symmetric_zero(bits)).float() * scales.index_select(0, flat)  # (M, H)
    return values.reshape(*ids.shape, dim)


# ---------------------------------------------------------------- module

@register_module_type
class QuantEmbedding(PackedModule):
    """A frozen word embedding stored as row-wise symmetric INT8 or INT4 codes.

    Args:
        num_embeddings, embedding_dim, padding_idx: as ``nn.Embedding``.
        bits: 4 or 8.
        dtype: the output dtype (name or ``torch.dtype``), the float table's dtype.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int = 8, padding_idx: int | None = None,
                 dtype: str | torch.dtype = "float32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.scheme = QuantScheme(bits, None, True)
        self.dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        packed = (embedding_dim + 1) // 2 if bits == 4 else embedding_dim
        self.register_buffer("qweight", torch.zeros(num_embeddings, packed, dtype=torch.uint8 if bits == 4 else torch.int8))
        self.register_buffer("scales", torch.ones(num_embeddings, 1, dtype=torch.float32))

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def quantized_weight_numel(self) -> int:
        """The number of weights ``qweight`` packs (counted as parameters in size reports)."""
        return self.num_embeddings * self.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return lookup_rows(input_ids, self.qweight, self.scales, self.bits, self.embedding_dim).to(self.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 table ``(V, H)`` this embedding looks rows up in."""
        h = self.embedding_dim
        return dequantize(self.qweight, self.scales, None, self.bits, h, h)

    # -- artifact swap protocol -------------------------------------------------
    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim, "bits": self.bits,
                "padding_idx": self.padding_idx, "dtype": str(self.dtype).removeprefix("torch.")}

    @classmethod
    def from_config(cls, config: dict) -> QuantEmbedding:
        return cls(**config)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int, where: str = "") -> QuantEmbedding:
        """Round-to-nearest, one symmetric scale per row."""
        weight = embedding.weight.detach()  # (V, H)
        layer = cls(embedding.num_embeddings, embedding.embedding_dim, bits, embedding.padding_idx, weight.dtype)
        packed = quantize_rtn(weight, layer.scheme, where)
        layer.qweight.copy_(packed["qweight"])
        layer.scales.copy_(packed["scales"])
        return layer.to(weight.device)

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}{pad}"


def tied_head(embedding: QuantEmbedding, head: nn.Linear) -> QuantLinear:
    """A per-channel ``QuantLinear`` over the embedding's table, sharing its ``qweight`` and ``scales`` tensors."""
    layer = QuantLinear(head.in_features, head.out_features, embedding.bits, None, True, head.bias is not None,
                        dtype=head.weight.dtype).to(embedding.qweight.device)
    layer.qweight, layer.scales = embedding.qweight, embedding.scales  # the same tensors, not copies
    if head.bias is not None:
        layer.bias.data.copy_(head.bias.data)
    return layer


# ---------------------------------------------------------------- surgery

def quantize_embedding_(model: nn.Module, bits: int) -> str:
    """Swap the model's input word embedding for a :class:`QuantEmbedding`, in place.

    If the LM head is tied to it (``config.tie_word_embeddings`` and the head's
    weight is the embedding's), the head is swapped too, for a ``QuantLinear``
    sharing the packed tensors, and ``config.tie_word_embeddings`` is set to
    False so transformers no longer tries to tie the (now absent) ``weight``.

    Args:
        model: a transformers model (``get_input_embeddings()``).
        bits: 4 or 8.

    Returns:
        The embedding's module name.

    Raises:
        SlimTuneError: no word embedding, or it is already quantized; unsupported bits.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, QuantEmbedding):
        raise SlimTuneError(f"{module_name(model, embedding)}: the word embedding is already quantized", "quantize a float model")
    if not isinstance(embedding, nn.Embedding):
        raise SlimTuneError(f"the model's input embedding is {type(embedding).__name__}, not an nn.Embedding",
                            "embedding quantization supports transformers models with nn.Embedding word embeddings")
    name = module_name(model, embedding)
    head = output_head_tied_to(model, embedding)
    quant = QuantEmbedding.from_embedding(embedding, bits, where=name)
    if head is not None:
        model.set_submodule(module_name(model, head), tied_head(quant, head))
        untie_config_(model)
    model.set_submodule(name, quant)
    return name


def output_head_tied_to(model: nn.Module, embedding: nn.Embedding) -> nn.Linear | None:
    """The LM head sharing ``embedding.weight`` (tied embeddings), or None."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if head is None or getattr(head, "weight", None) is not embedding.weight:
        return None
    if not isinstance(head, nn.Linear):
        raise SlimTuneError(f"the output head tied to the word embedding is a {type(head).__name__}, not an nn.Linear",
                            "embedding quantization of tied heads supports linear heads only")
    return head


def untie_config_(model: nn.Module) -> None:
    """Stop transformers tying ``lm_head.weight`` to the embedding's ``weight``: the tie now lives in shared buffers."""
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def module_name(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise SlimTuneError(f"{type(module).__name__} is not a submodule of the model", "pass the model that owns it")

