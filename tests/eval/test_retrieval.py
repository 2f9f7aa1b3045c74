"""Retrieval and similarity: metrics against hand-computed values, exact search against a full sort, loaders' errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from slimtune.errors import SlimTuneError
from slimtune.eval.retrieval import (average_ranks, exact_search, load_beir, load_similarity, mrr_at_k, ndcg_at_k,
                                     pearson, pearson_numpy, recall_at_k, retrieval_metrics, spearman, spearman_numpy)

# q1 judges d1 highly relevant (2), d2 and d4 relevant (1), d3 not relevant (0); q2 has one relevant doc.
QRELS = {"q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1}, "q2": {"d2": 1}}
RUN = {"q1": ["d3", "d5", "d1", "d2", "d4"], "q2": ["d2", "d1"]}


# --- metrics ---------------------------------------------------------------------------------

def test_ndcg_with_graded_relevance():
    # q1 top 3 = d3 (gain 0), d5 (unjudged, 0), d1 (gain 2): DCG@3 = 2 / log2(3 + 1) = 1.0
    # ideal gains 2, 1, 1 (the 0 is cut): IDCG@3 = 2/log2(2) + 1/log2(3) + 1/log2(4) = 2 + 0.63093 + 0.5 = 3.13093
    q1 = 1.0 / (2 + 1 / math.log2(3) + 0.5)  # = 0.31939
    # q2: its only relevant doc is first: DCG = IDCG = 1 / log2(2) = 1
    assert ndcg_at_k(RUN, QRELS, k=3) == pytest.approx((q1 + 1.0) / 2, abs=1e-12)
    assert ndcg_at_k({"q1": RUN["q1"]}, {"q1": QRELS["q1"]}, k=3) == pytest.approx(0.319393, abs=1e-6)
    # k = 5 adds d2 at rank 4 (1/log2(5) = 0.43068) and d4 at rank 5 (1/log2(6) = 0.38685); the ideal adds a 0 gain
    q1_at_5 = (1.0 + 1 / math.log2(5) + 1 / math.log2(6)) / (2 + 1 / math.log2(3) + 0.5)
    assert ndcg_at_k({"q1": RUN["q1"]}, {"q1": QRELS["q1"]}, k=5) == pytest.approx(q1_at_5, abs=1e-12)
    assert q1_at_5 == pytest.approx(1.81753 / 3.13093, abs=1e-5)


def test_mrr_first_relevant_at_rank_three_and_beyond_k():
    q1 = {"q1": QRELS["q1"]}
    assert mrr_at_k(RUN, q1, k=10) == pytest.approx(1 / 3)  # d3 is not relevant (0), d5 unjudged, d1 at rank 3
    assert mrr_at_k(RUN, q1, k=2) == 0.0  # the first relevant doc is beyond k
    assert mrr_at_k(RUN, QRELS, k=10) == pytest.approx((1 / 3 + 1) / 2)  # q2's relevant doc is first


def test_recall_with_several_relevant_docs():
    q1 = {"q1": QRELS["q1"]}
    # q1's relevant docs are d1, d2, d4 (d3 has relevance 0)
    assert recall_at_k(RUN, q1, k=3) == pytest.approx(1 / 3)  # d1
    assert recall_at_k(RUN, q1, k=4) == pytest.approx(2 / 3)  # d1, d2
    assert recall_at_k(RUN, q1, k=5) == 1.0
    assert recall_at_k(RUN, QRELS, k=1) == pytest.approx((0 + 1) / 2)


def test_queries_without_relevant_docs_are_not_averaged_and_unranked_queries_score_zero():
    qrels = {**QRELS, "q3": {"d1": 0}, "q4": {"d4": 1}}  # q3: nothing relevant (skipped); q4: absent from the run (0)
    # recall@5 over q1, q2, q4 = (1 + 1 + 0) / 3
    assert recall_at_k(RUN, qrels, k=5) == pytest.approx(2 / 3)
    metrics = retrieval_metrics(RUN, qrels)
    assert metrics["mrr@10"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert set(metrics) == {"mrr@10", "ndcg@10", "recall@1", "recall@10", "recall@100"}
    with pytest.raises(ValueError, match="no document relevant"):
        mrr_at_k(RUN, {"q3": {"d1": 0}})
    with pytest.raises(ValueError, match="k must be"):
        ndcg_at_k(RUN, QRELS, k=0)


# --- exact search ----------------------------------------------------------------------------

def full_sort(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 cosine of every pair, sorted by (score desc, index asc), cut at k."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = corpus / np.linalg.norm(corpus, axis=1, keepdims=True)
    scores = q @ c.T  # (Q, N)
    order = np.stack([np.lexsort((np.arange(len(c)), -row)) for row in scores])[:, :k]
    return np.take_along_axis(scores, order, 1), order


def unambiguous_inputs(n: int, q: int = 5, d: int = 16):
    """Random (q, d) queries and (n, d) corpus whose float64 ranking float32 cannot change, with the reference sort.

    A float32 cosine of d-dim vectors is within about (2d + 4) * 2^-24 = 2.1e-6 of the exact one (d terms of the
    dot product, d/2 + 2 in each norm), so scores 1e-5 apart keep their order; seeds are drawn until all neighbours are.
    """
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        queries, corpus = torch.randn(q, d, generator=gen), torch.randn(n, d, generator=gen)
        scores, order = full_sort(queries.double().numpy(), corpus.double().numpy(), n)
        if np.diff(-scores, axis=1).min() > 1e-5:
            return queries, corpus, scores, order
    raise AssertionError("no seed gave an unambiguous ranking")


@pytest.mark.parametrize("n, k, chunk_size", [(37, 10, 8), (7, 10, 3), (64, 5, 16), (50, 1, 50), (33, 33, 1)])
def test_exact_search_matches_a_full_sort(n, k, chunk_size):
    queries, corpus, ref_scores, ref_order = unambiguous_inputs(n)
    scores, indices = exact_search(queries, corpus, k, chunk_size=chunk_size)
    assert scores.shape == indices.shape == (5, min(k, n))  # N < k returns all N
    assert indices.dtype == torch.long and scores.dtype == torch.float32
    np.testing.assert_array_equal(indices.numpy(), ref_order[:, :k])
    np.testing.assert_allclose(scores.numpy(), ref_scores[:, :k], atol=1e-6)


def test_exact_search_breaks_ties_by_index_whatever_the_chunks():
    # one-hot and (1,1,1,1) rows make exact cosines: e1 scores 1, (1,1,1,1)/2 scores 0.5, e2 scores 0
    e1, e2, ones = [1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 1, 1, 1]
    corpus = torch.tensor([e2, ones, e1, e2, e1, ones, e1, e2, ones, e1])  # e1 at 2, 4, 6, 9; ones at 1, 5, 8
    expected = [2, 4, 6, 9, 1, 5]
    for chunk_size in (1, 2, 3, 4, 10, 100):
        scores, indices = exact_search(torch.tensor([e1]) * 3.0, corpus, k=6, chunk_size=chunk_size)
        assert indices.tolist() == [expected], chunk_size
        assert scores.tolist() == [[1.0, 1.0, 1.0, 1.0, 0.5, 0.5]]


def test_exact_search_refuses_bad_inputs():
    with pytest.raises(ValueError, match="need"):
        exact_search(torch.ones(2, 3), torch.ones(4, 5), k=1)
    with pytest.raises(ValueError, match="at least 1"):
        exact_search(torch.ones(2, 3), torch.ones(4, 3), k=0)
    with pytest.raises(ValueError, match="NaN"):
        exact_search(torch.ones(2, 3), torch.full((4, 3), math.nan), k=1)


# --- correlation -----------------------------------------------------------------------------

def test_average_ranks_share_ties():
    # sorted: 5 (rank 1), 10 (rank 2), three 20s span ranks 3, 4, 5 -> (3 + 4 + 5) / 3 = 4
    assert average_ranks([10, 20, 20, 20, 5]).tolist() == [2, 4, 4, 4, 1]


@pytest.mark.parametrize("fn", [spearman, spearman_numpy])
def test_spearman_with_ties(fn):
    # ranks of a = [1, 2.5, 2.5, 4], of b = [1, 3, 2, 4]; both have mean 2.5
    # deviations: a [-1.5, 0, 0, 1.5], b [-1.5, .5, -.5, 1.5]
    # sum da*db = 2.25 + 2.25 = 4.5; sum da^2 = 4.5; sum db^2 = 2.25 + .25 + .25 + 2.25 = 5
    # r = 4.5 / sqrt(4.5 * 5) = sqrt(0.9) = 0.948683
    assert fn([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert fn([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)  # monotone
    assert fn([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("fn", [pearson, pearson_numpy])
def test_pearson_by_hand(fn):
    # a = [1, 2, 3] (mean 2), b = [2, 4, 7] (mean 13/3): da = [-1, 0, 1], db = [-7/3, -1/3, 8/3]
    # sum da*db = 7/3 + 8/3 = 5; sum da^2 = 2; sum db^2 = (49 + 1 + 64) / 9 = 114/9
    # r = 5 / sqrt(2 * 114 / 9) = 15 / sqrt(228) = 0.993399
    assert fn([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / math.sqrt(228), abs=1e-12)
    assert fn([1, 2, 3], [2, 4, 7]) == pytest.approx(0.993399, abs=1e-6)


@pytest.mark.parametrize("fn", [pearson, spearman, pearson_numpy, spearman_numpy])
def test_correlation_of_a_constant_is_nan(fn):
    assert math.isnan(fn([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="same length"):
        fn([1, 2], [1, 2, 3])


def test_our_correlations_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.integers(0, 6, 30).astype(float)  # many ties
        b = a + rng.normal(0, 2, 30)
        assert spearman_numpy(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
        assert pearson_numpy(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)


# --- BEIR folders ----------------------------------------------------------------------------

CORPUS = [{"_id": "d1", "title": "Cats", "text": "cats purr"}, {"_id": "d2", "text": "dogs bark"}, {"_id": "d3", "title": "", "text": "fish swim"}]
QUERIES = [{"_id": "q1", "text": "what purrs"}, {"_id": "q2", "text": "who barks"}, {"_id": "q9", "text": "never judged"}]
QRELS_TSV = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t0\nq2\td2\t1\n"


def write_beir(folder: Path, corpus=None, queries=None, qrels: str | None = QRELS_TSV, qrels_name: str = "qrels.tsv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus if corpus is not None else CORPUS), ("queries.jsonl", queries if queries is not None else QUERIES)):
        (folder / name).write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    if qrels is not None:
        (folder / qrels_name).parent.mkdir(exist_ok=True)
        (folder / qrels_name).write_text(qrels)
    return folder


@pytest.mark.parametrize("qrels_name", ["qrels.tsv", "qrels/test.tsv"])
def test_load_beir(tmp_path, qrels_name):
    corpus, queries, qrels = load_beir(write_beir(tmp_path / "beir", qrels_name=qrels_name))
    assert corpus == {"d1": "Cats cats purr", "d2": "dogs bark", "d3": "fish swim"}
    assert queries == {"q1": "what purrs", "q2": "who barks"}  # q9 has no judgement: dropped, as BEIR does
    assert qrels == {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1}}


BAD_BEIR = {
    "no corpus": (dict(corpus=[]), "corpus.jsonl", "is empty"),
    "bad json": (dict(corpus=[CORPUS[0], '{"_id": "d2", "text": \n']), "corpus.jsonl", "line 2: not valid JSON"),
    "not an object": (dict(queries=["[1, 2]\n"]), "queries.jsonl", "line 1: a JSON list"),
    "no _id": (dict(corpus=[CORPUS[0], {"text": "x"}]), "corpus.jsonl", "line 2: no '_id'"),
    "no text": (dict(queries=[{"_id": "q1", "title": "t"}]), "queries.jsonl", "line 1: no 'text'"),
    "repeated id": (dict(corpus=CORPUS + [CORPUS[1]]), "corpus.jsonl", "line 4: _id 'd2' repeats line 2"),
    "unknown doc": (dict(qrels=QRELS_TSV + "q2\td7\t1\n"), "qrels.tsv", "line 5: corpus-id 'd7' is not in corpus.jsonl"),
    "unknown query": (dict(qrels=QRELS_TSV + "q5\td1\t1\n"), "qrels.tsv", "line 5: query-id 'q5' is not in queries.jsonl"),
    "empty qrels": (dict(qrels="query-id\tcorpus-id\tscore\n"), "qrels.tsv", "no judgements"),
    "nothing relevant": (dict(qrels="query-id\tcorpus-id\tscore\nq1\td1\t0\n"), "qrels.tsv", "no relevant document"),
    "bad header": (dict(qrels="q1\td1\t1\n"), "qrels.tsv", "line 1: header"),
    "bad score": (dict(qrels=QRELS_TSV + "q2\td1\thigh\n"), "qrels.tsv", "line 5: score 'high' is not an integer"),
    "two fields": (dict(qrels=QRELS_TSV + "q2 d1 1\n"), "qrels.tsv", "line 5: 1 tab-separated fields"),
    "judged twice": (dict(qrels=QRELS_TSV + "q1\td1\t1\n"), "qrels.tsv", "judged twice"),
}


@pytest.mark.parametrize("case", BAD_BEIR)
def test_bad_beir_folders_name_the_file(tmp_path, case):
    kwargs, file, message = BAD_BEIR[case]
    folder = write_beir(tmp_path / "beir", **kwargs)
    with pytest.raises(SlimTuneError) as err:
        load_beir(folder)
    assert str(folder / file) in err.value.message and message in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("missing", ["corpus.jsonl", "queries.jsonl"])
def test_a_missing_beir_file_is_named(tmp_path, missing):
    folder = write_beir(tmp_path / "beir")
    (folder / missing).unlink()
    with pytest.raises(SlimTuneError, match=f"{folder / missing} does not exist"):
        load_beir(folder)


def test_missing_qrels_and_folder_are_named(tmp_path):
    folder = write_beir(tmp_path / "beir", qrels=None)
    with pytest.raises(SlimTuneError, match=r"beir has no relevance judgements: neither qrels.tsv nor qrels/test.tsv"):
        load_beir(folder)
    with pytest.raises(SlimTuneError, match="nowhere does not exist"):
        load_beir(tmp_path / "nowhere")


# --- similarity files ------------------------------------------------------------------------

@pytest.mark.parametrize("name, content", [
    ("pairs.csv", 'text_a,text_b,score,source\n"a cat, sleeping",a dog,4.5,x\nred,blue,0,y\n'),
    ("pairs.tsv", "text_a\ttext_b\tscore\na cat, sleeping\ta dog\t4.5\nred\tblue\t0\n"),
    ("pairs.jsonl", '{"text_a": "a cat, sleeping", "text_b": "a dog", "score": 4.5}\n\n{"text_a": "red", "text_b": "blue", "score": "0"}\n'),
])
def test_load_similarity(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    assert load_similarity(tmp_path / name) == (["a cat, sleeping", "red"], ["a dog", "blue"], [4.5, 0.0])


def test_tsv_keeps_quotes_literally(tmp_path):
    (tmp_path / "sts.tsv").write_text('text_a\ttext_b\tscore\nhe said "hi\tok\t3\n')
    assert load_similarity(tmp_path / "sts.tsv") == (['he said "hi'], ["ok"], [3.0])


BAD_SIMILARITY = {
    "no score column": ("p.csv", "text_a,text_b,label\na,b,1\n", "no column 'score'; it has: text_a, text_b, label"),
    "no score key": ("p.jsonl", '{"text_a": "a", "text_b": "b", "gold": 1}\n', "line 1: no column 'score'; it has: text_a, text_b, gold"),
    "text score": ("p.tsv", "text_a\ttext_b\tscore\na\tb\t1\nc\td\thigh\n", "line 3: score 'high' is not a finite number"),
    "nan score": ("p.csv", "text_a,text_b,score\na,b,nan\n", "line 2: score 'nan' is not a finite number"),
    "short row": ("p.csv", "text_a,text_b,score\na\n", "line 2: no text_b value"),
    "empty file": ("p.csv", "", "is empty"),
    "header only": ("p.csv", "text_a,text_b,score\n", "has no rows"),
    "bad json": ("p.jsonl", '{"text_a": \n', "line 1: not valid JSON"),
    "unknown format": ("p.xlsx", "", "unknown similarity file format '.xlsx'"),
}


@pytest.mark.parametrize("case", BAD_SIMILARITY)
def test_bad_similarity_files_name_the_file(tmp_path, case):
    name, content, message = BAD_SIMILARITY[case]
    (tmp_path / name).write_text(content)
    with pytest.raises(SlimTuneError) as err:
        load_similarity(tmp_path / name)
    assert str(tmp_path / name) in err.value.message and message in err.value.message


def test_a_missing_similarity_file_is_named(tmp_path):
    with pytest.raises(SlimTuneError, match="absent.csv does not exist"):
        load_similarity(tmp_path / "absent.csv")
