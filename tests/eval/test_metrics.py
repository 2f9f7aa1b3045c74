"""Every task metric and the contrastive loss against an independent computation.

* accuracy: hand-made logits whose right answers are counted by hand;
* perplexity: ``exp`` of the Hugging Face model's own mean loss (``labels=``)
  on unpadded single sequences, token-weighted over sequences, for every way
  of padding and batching them;
* centroid accuracy: numpy, from the token states a stub encoder returns;
* supervised contrastive loss: loops over anchors and positives in numpy,
  straight from Khosla et al. (2020), eq. 2 (L_out).
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from slimtune.tasks import Classification, CausalLM, Collator, Embedding, supcon_loss


class TableModel(nn.Module):
    """Returns the rows of a fixed table: the example id is the first input id."""

    def __init__(self, table: torch.Tensor, field: str):
        super().__init__()
        self.table, self.field = table, field

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        return SimpleNamespace(**{self.field: self.table[input_ids[:, 0]]})


def random_masks(n: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, width) attention masks: each example keeps 1..width tokens, the rest is padding."""
    lengths = np.random.default_rng(seed).integers(1, width + 1, n)
    return (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)


def id_batches(ids: list[int], labels: list[int], batch_size: int, masks: np.ndarray | None = None) -> list[dict]:
    """Batches whose first token is the example id; ``masks[id]`` is its attention mask (random padding by default)."""
    masks = random_masks(max(ids, default=0) + 1, 4) if masks is None else masks
    out = []
    for i in range(0, len(ids), batch_size):
        chunk = ids[i : i + batch_size]
        mask = torch.tensor(masks[chunk])  # (B, T)
        input_ids = torch.zeros_like(mask)
        input_ids[:, 0] = torch.tensor(chunk)
        out.append({"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor(labels[i : i + batch_size])})
    return out


# ---------------------------------------------------------------- accuracy


def test_accuracy_on_hand_made_logits():
    logits = torch.tensor([
        [2.0, 1.0, 0.0],   # predicts 0, label 0: right
        [0.0, 3.0, 1.0],   # predicts 1, label 2: wrong
        [1.0, 1.0, 0.0],   # tie between 0 and 1: the first maximum (0) is predicted, label 0: right
        [1.0, 1.0, 0.0],   # the same tie, label 1: wrong
        [0.0, 0.0, 5.0],   # predicts 2, label 2: right
        [-1.0, -2.0, -3.0],  # predicts 0, label 1: wrong
        [0.0, 0.5, 0.4],   # predicts 1, label 1: right
    ])
    labels = [0, 2, 0, 1, 2, 1, 1]
    right = 4  # counted by hand above
    model = TableModel(logits, "logits")
    for batch_size in (1, 3, 7, 10):  # 3: a short last batch of 1
        result = Classification().evaluate(model, id_batches(list(range(7)), labels, batch_size))
        assert result == {"accuracy": right / 7, "examples": 7}
    assert right == int((logits.numpy().argmax(1) == np.array(labels)).sum())  # numpy agrees with the hand count


def test_accuracy_of_nothing_is_zero_not_a_crash():
    assert Classification().evaluate(TableModel(torch.zeros(1, 2), "logits"), []) == {"accuracy": 0.0, "examples": 0}


# ---------------------------------------------------------------- perplexity


SENTENCES = ["the movie was good", "a really dull and boring plot", "fun", "the acting was superb and the story was lovely 7",
             "bad film"]


@pytest.fixture(scope="module")
def llama(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():  # a random model predicts near-uniformly; bigger weights make per-sentence losses differ
        for p in model.parameters():
            p.mul_(4.0)
    return model, AutoTokenizer.from_pretrained(tiny_llama)


def hf_reference(model, tokenizer, sentences) -> tuple[float, float]:
    """(token-weighted perplexity, batch-mean-of-means perplexity) from the model's own loss, one unpadded sentence at a time."""
    losses, counts = [], []
    for s in sentences:
        ids = tokenizer(s, return_tensors="pt")["input_ids"]  # (1, T), no padding
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss.item())  # mean over the T-1 predicted tokens
        counts.append(ids.shape[1] - 1)
    weighted = np.exp(np.dot(losses, counts) / np.sum(counts))
    return float(weighted), float(np.exp(np.mean(losses)))


def lm_batches(tokenizer, sentences, batch_size, padding_side="right"):
    tokenizer.padding_side = padding_side
    collate = Collator(tokenizer, max_length=64, kind="causal-lm")
    return [collate([{"text": s} for s in sentences[i : i + batch_size]]) for i in range(0, len(sentences), batch_size)]


def test_perplexity_of_one_unpadded_sentence_is_exp_of_the_model_loss(llama):
    model, tokenizer = llama
    ids = tokenizer(SENTENCES[3], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = float(torch.exp(model(input_ids=ids, labels=ids).loss))
    result = CausalLM().evaluate(model, lm_batches(tokenizer, SENTENCES[3:4], 1))
    assert result["tokens"] == ids.shape[1] - 1
    assert result["perplexity"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2, 5])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_perplexity_is_token_weighted_whatever_the_padding_and_batching(llama, batch_size, padding_side):
    model, tokenizer = llama
    weighted, mean_of_means = hf_reference(model, tokenizer, SENTENCES)
    assert abs(weighted - mean_of_means) / weighted > 1e-3  # the check below can tell the two apart
    result = CausalLM().evaluate(model, lm_batches(tokenizer, SENTENCES, batch_size, padding_side))
    assert result["tokens"] == sum(len(tokenizer(s)["input_ids"]) - 1 for s in SENTENCES)
    # fp32 logits over <= 16 positions; padding only adds masked (exactly zero-weight) keys: agreement to ~1e-6
    assert result["perplexity"] == pytest.approx(weighted, rel=1e-5)


def test_perplexity_of_a_left_padded_batch_counts_each_sentence_once(llama):
    """A batch padded on the left by its caller (not the Collator): the first real token has no real predecessor."""
    model, tokenizer = llama
    weighted, _ = hf_reference(model, tokenizer, SENTENCES)
    tokenizer.padding_side = "left"
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (enc["attention_mask"][:, 0] == 0).any()  # really left-padded
    result = CausalLM().evaluate(model, [{"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}])
    assert result["tokens"] == int(enc["attention_mask"].sum()) - len(SENTENCES)
    # Llama's rotary positions are relative, so shifted absolute positions change logits only by rounding
    assert result["perplexity"] == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize("chunk", [3, 7, 1000])
def test_chunked_training_loss_equals_the_whole_logits_loss(llama, monkeypatch, chunk):
    """The LM head over chunks of positions (large vocabularies) gives the same loss and gradients as whole logits."""
    import copy

    import slimtune.tasks as tasks

    model, tokenizer = llama
    model = copy.deepcopy(model).train()
    batch = lm_batches(tokenizer, SENTENCES, 5)[0]
    monkeypatch.setattr(tasks, "CHUNKED_LOGITS_BYTES", float("inf"))  # whole logits
    whole, n = CausalLM().loss(model, batch)
    whole.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    monkeypatch.setattr(tasks, "CHUNKED_LOGITS_BYTES", 0)
    monkeypatch.setattr(tasks, "CHUNK_POSITIONS", chunk)
    assert tasks._chunkable_head(model, 1) is model.lm_head
    chunked, m = CausalLM().loss(model, batch)
    chunked.backward()
    assert m == n
    # The same per-position fp32 losses (chunking does not change any position's logits), summed in another
    # order and divided by n: all terms are positive, so the two sums differ by at most gamma_81 (80 positions
    # and the division; gamma_n = n u / (1 - n u), Higham, Lemma 3.1) of the loss itself.
    u = 2.0**-24
    assert chunked.item() == pytest.approx(whole.item(), rel=81 * u / (1 - 81 * u))
    # Gradients: each weight's gradient sums the same per-position products in chunk order instead of one
    # GEMM's order, off by at most gamma_80 (4.8e-6) of the sum of |terms|: rtol 1e-5, atol 1e-7 for entries
    # that cancel near zero.
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation never chunks (no backward to save memory for)
        assert tasks._chunkable_head(model, 10**9) is None


# ---------------------------------------------------------------- centroid accuracy


def numpy_centroid_accuracy(states, masks, train, test) -> float:
    """Mean-pool over the mask, L2-normalise, class centroids of train (normalised mean), nearest by cosine."""
    def embed(i):
        m = masks[i][:, None]
        v = (states[i] * m).sum(0) / m.sum()
        return v / np.linalg.norm(v)

    classes = sorted({y for _, y in train})
    centroids = []
    for c in classes:
        mean = np.mean([embed(i) for i, y in train if y == c], axis=0)
        centroids.append(mean / np.linalg.norm(mean))
    right = sum(classes[int(np.argmax(np.array(centroids) @ embed(i)))] == y for i, y in test)
    return right / len(test)


@pytest.mark.parametrize("absent_class", [False, True])
def test_centroid_accuracy_against_numpy(absent_class):
    rng = np.random.default_rng(1)
    n, width, hidden = 40, 4, 6
    labels = rng.integers(0, 3, n)
    if absent_class:
        labels = np.where(labels == 1, 2, labels)  # class 1 has no train example...
        labels[-3:] = 1                            # ...but three test examples
    means = rng.normal(size=(3, hidden)) * 0.6  # overlapping classes: some test examples are misplaced
    masks = random_masks(n, width, seed=2)
    states = rng.normal(size=(n, width, hidden)) + means[labels][:, None, :]
    states = np.where(masks[:, :, None] == 1, states, 1e3)  # padded positions hold garbage the mask must remove
    train = [i for i in range(28) if not (absent_class and labels[i] == 1)]
    test = list(range(28, n))
    expected = numpy_centroid_accuracy(states, masks, [(i, labels[i]) for i in train], [(i, labels[i]) for i in test])

    model = TableModel(torch.tensor(states, dtype=torch.float64), "last_hidden_state")
    train_batches = id_batches(train, labels[train].tolist(), 8, masks)
    test_batches = id_batches(test, labels[test].tolist(), 5, masks)  # 12 examples: a short last batch
    result = Embedding().evaluate(model, test_batches, train_batches)
    assert result["examples"] == len(test)
    assert result["centroid_accuracy"] == pytest.approx(expected, abs=1e-12)
    assert 0 < expected < 1  # neither trivially right nor wrong


def test_an_absent_class_is_never_predicted():
    """Class 1 has no train example: its centroid must not win because every real class is dissimilar (cosine < 0)."""
    states = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[-1.0, -1.0]]], dtype=torch.float64)  # (3 examples, 1 token, 2)
    model = TableModel(states, "last_hidden_state")
    ones = np.ones((3, 1), dtype=np.int64)
    train = id_batches([0, 1], [0, 2], 2, ones)
    test = id_batches([2], [0], 1, ones)  # cosine -0.71 to both centroids; the tie goes to class 0
    assert Embedding().evaluate(model, test, train)["centroid_accuracy"] == 1.0


# ---------------------------------------------------------------- supervised contrastive loss


def supcon_by_loops(z: np.ndarray, labels: list[int], temperature: float) -> float:
    """Khosla et al. (2020), eq. 2: L_i = -1/|P(i)| sum_p log(exp(z_i.z_p/t) / sum_{a != i} exp(z_i.z_a/t)),
    averaged over the anchors that have a positive (L_i is undefined without one)."""
    per_anchor = []
    for i in range(len(z)):
        positives = [p for p in range(len(z)) if p != i and labels[p] == labels[i]]
        if not positives:
            continue
        denominator = sum(np.exp(z[i] @ z[a] / temperature) for a in range(len(z)) if a != i)
        per_anchor.append(-np.mean([np.log(np.exp(z[i] @ z[p] / temperature) / denominator) for p in positives]))
    return float(np.mean(per_anchor)) if per_anchor else 0.0


@pytest.mark.parametrize("labels", [
    [0, 0, 1, 1, 2, 2],
    [0, 1, 1, 2, 2, 2, 3],       # class 0 and class 3 appear once: anchors without positives
    [5, 5, 5, 5],
    [0, 1, 2],                   # nobody has a positive: zero loss
])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_supcon_loss_against_the_paper_formula(labels, temperature):
    gen = torch.Generator().manual_seed(len(labels))
    z = nn.functional.normalize(torch.randn(len(labels), 8, generator=gen, dtype=torch.float64), dim=-1)
    expected = supcon_by_loops(z.numpy(), labels, temperature)
    got = supcon_loss(z, torch.tensor(labels), temperature)
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_supcon_gradient_matches_finite_differences_of_the_formula():
    labels = [0, 1, 1, 2, 2, 2, 3]
    gen = torch.Generator().manual_seed(3)
    z = nn.functional.normalize(torch.randn(len(labels), 5, generator=gen, dtype=torch.float64), dim=-1).requires_grad_()
    supcon_loss(z, torch.tensor(labels), 0.2).backward()
    base, h = z.detach().numpy(), 1e-6
    numeric = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        up, down = base.copy(), base.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (supcon_by_loops(up, labels, 0.2) - supcon_by_loops(down, labels, 0.2)) / (2 * h)
    assert torch.isfinite(z.grad).all()
    np.testing.assert_allclose(z.grad.numpy(), numeric, rtol=1e-6, atol=1e-7)
