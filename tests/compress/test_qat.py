"""QAT: fake quantization with a straight-through estimator, and conversion to QuantLinear."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import quantize_per_token_int8
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.qat import FakeQuantLinear, convert_qat_, prepare_qat_
from slimtune.compress.quant.rtn import QuantScheme, fake_quantize

from tests.compress.models import bert, llama

SCHEMES = {
    "int4-g32-sym": QuantScheme(4, 32, True),
    "int4-g32-asym": QuantScheme(4, 32, False),
    "int4-g64-asym": QuantScheme(4, 64, False),  # K=32 layers: one short group
    "int4-per-channel": QuantScheme(4, None, True),
    "int8": QuantScheme(8, None, True),
}


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def model_inputs(family: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_weight_gradient_is_the_float_gradient_at_the_quantized_weight():
    torch.manual_seed(0)
    linear = nn.Linear(80, 24)  # K=80 with groups of 32: the last group is short
    scheme = QuantScheme(4, 32, False)
    fake = FakeQuantLinear(linear, scheme)
    x, dy = torch.randn(5, 80, requires_grad=True), torch.randn(5, 24)
    (fake(x) * dy).sum().backward()

    w_q = fake_quantize(linear.weight.detach(), scheme, 32).requires_grad_()  # (N, K), a leaf
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, w_q, linear.bias.detach())
    (y_ref * dy).sum().backward()
    assert torch.equal(fake(x), y_ref)
    torch.testing.assert_close(linear.weight.grad, w_q.grad)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(linear.bias.grad, dy.sum(0))
    assert not torch.allclose(w_q, linear.weight)  # the forward really did quantize


def test_activation_fake_quantization_is_per_token_int8_with_straight_through_gradient():
    torch.manual_seed(0)
    linear = nn.Linear(32, 16)
    fake = FakeQuantLinear(linear, QuantScheme(8, None, True), act_bits=8)
    x, dy = torch.randn(2, 3, 32, requires_grad=True), torch.randn(2, 3, 16)
    y = fake(x)
    (y * dy).sum().backward()

    codes, scale = quantize_per_token_int8(x.detach().reshape(6, 32))  # (M, K), (M, 1)
    x_q = (codes.float() * scale).reshape(2, 3, 32).requires_grad_()
    w_q = fake_quantize(linear.weight.detach(), fake.scheme, 32)
    y_ref = F.linear(x_q, w_q, linear.bias.detach())
    (y_ref * dy).sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(x.grad, x_q.grad)  # passed straight through the rounding
    assert not torch.allclose(x_q, x)


def test_wrapper_keeps_the_original_layer_and_reads_its_current_weight():
    model = bert(layers=1)
    name = "bert.encoder.layer.0.attention.self.query"
    original = model.get_submodule(name)
    assert prepare_qat_(model, {name: QuantScheme(4, 32, True)}) == [name]
    wrapper = model.get_submodule(name)
    assert isinstance(wrapper, FakeQuantLinear) and wrapper.base_layer is original
    x = torch.randn(2, 32)
    before = wrapper(x)
    with torch.no_grad():
        original.weight.mul_(2.0)  # no cached quantized weight: the next forward sees the new one
    torch.testing.assert_close(wrapper(x), 2 * (before - original.bias) + original.bias, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", SCHEMES.values(), ids=SCHEMES.keys())
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_converted_model_computes_what_the_fake_quantized_one_did(family, scheme):
    model = bert(layers=2) if family == "bert" else llama(layers=2)
    names = linear_names(model)
    inputs = model_inputs(family)
    with torch.no_grad():
        float_out = model(**inputs).logits
        assert prepare_qat_(model, {n: scheme for n in names}) == names
        fake_out = model(**inputs).logits
        assert convert_qat_(model) == names
        quant_out = model(**inputs).logits
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    assert not torch.allclose(fake_out, float_out, atol=1e-4)
    torch.testing.assert_close(quant_out, fake_out, rtol=0, atol=1e-5)


def test_converted_w8a8_model_computes_what_the_fake_quantized_one_did():
    model = llama(layers=2)
    names = linear_names(model)
    inputs = model_inputs("llama")
    with torch.no_grad():
        prepare_qat_(model, {n: QuantScheme(8, None, True) for n in names}, {n: 8 for n in names})
        fake_out = model(**inputs).logits
        convert_qat_(model)
        quant_out = model(**inputs).logits
    assert all(model.get_submodule(n).act_bits == 8 for n in names)
    torch.testing.assert_close(quant_out, fake_out, rtol=0, atol=1e-4)


def toy_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random filler tokens with one cue token (5 or 6) that gives the label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 40, (n, 8), generator=g)  # (B, T)
    labels = torch.randint(0, 2, (n,), generator=g)
    position = torch.randint(0, 8, (n,), generator=g)
    ids[torch.arange(n), position] = 5 + labels
    return ids, labels


def test_qat_training_lowers_the_loss_and_conversion_keeps_the_accuracy():
    torch.manual_seed(0)
    model = bert(layers=2).train()
    prepare_qat_(model, {n: QuantScheme(4, 32, True) for n in linear_names(model)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, labels = toy_task(256, seed=0)
    losses = []
    for step in range(40):
        batch = slice(32 * (step % 8), 32 * (step % 8 + 1))
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    model.eval()
    test_ids, test_labels = toy_task(128, seed=1)
    with torch.no_grad():
        fake_logits = model(input_ids=test_ids).logits
        convert_qat_(model)
        quant_logits = model(input_ids=test_ids).logits
    torch.testing.assert_close(quant_logits, fake_logits, rtol=0, atol=1e-5)
    fake_acc = (fake_logits.argmax(-1) == test_labels).float().mean()
    quant_acc = (quant_logits.argmax(-1) == test_labels).float().mean()
    assert fake_acc > 0.9
    assert quant_acc == fake_acc


def test_bad_targets_raise_and_leave_the_model_untouched():
    model = bert(layers=1)
    query = "bert.encoder.layer.0.attention.self.query"
    with pytest.raises(SlimTuneError, match="not an nn.Linear"):
        prepare_qat_(model, {query: QuantScheme(), "bert.embeddings.word_embeddings": QuantScheme(4, 32)})
    with pytest.raises(SlimTuneError, match="not found"):
        prepare_qat_(model, {"bert.nope": QuantScheme(4, 32)})
    with pytest.raises(SlimTuneError, match="act_bits=8 .*needs 8-bit weights"):
        prepare_qat_(model, {query: QuantScheme(4, 32)}, {query: 8})
    with pytest.raises(SlimTuneError, match="act_bits=4"):
        prepare_qat_(model, {query: QuantScheme(8, None)}, {query: 4})
    assert not any(isinstance(m, FakeQuantLinear) for m in model.modules())

    prepare_qat_(model, {query: QuantScheme(4, 32)})
    with pytest.raises(SlimTuneError, match="already quantized \\(FakeQuantLinear\\)"):
        prepare_qat_(model, {query: QuantScheme(4, 32)})
    convert_qat_(model)
    with pytest.raises(SlimTuneError, match="already quantized \\(QuantLinear\\)"):
        prepare_qat_(model, {query: QuantScheme(4, 32)})
