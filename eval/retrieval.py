"""Embedding students as retrievers and similarity models: data loaders and metrics.

Retrieval follows BEIR (Thakur et al., 2021): a local folder with
``corpus.jsonl``, ``queries.jsonl`` and qrels, exact cosine search over the
corpus embeddings (:func:`exact_search`), and MRR@k, nDCG@k and Recall@k
computed as pytrec_eval / trec_eval do (linear gain, log2 discount, ideal DCG
from the qrels). Sentence-pair similarity follows STS: Spearman and Pearson
correlation between the model's cosine similarities and the gold scores.

The metrics are pure functions of a ranking (``run: {query id: [doc id, ...]}``
best first, no repeats) and the qrels (``{query id: {doc id: relevance}}``);
they know nothing of models. A relevance above 0 counts as relevant; 0 or
below is judged not relevant (gain 0). Every metric is averaged over the
queries of the qrels that have at least one relevant document; such a query
missing from the run counts as an empty ranking (0).

Limits: exact search is O(queries x corpus) matrix products, fine up to a few
hundred thousand documents; no approximate index.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from slimtune.errors import DataError

QRELS_HEADER = ["query-id", "corpus-id", "score"]
SIMILARITY_COLUMNS = ("text_a", "text_b", "score")
SIMILARITY_SUFFIXES = (".csv", ".tsv", ".jsonl")

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]


# --- BEIR folders ------------------------------------------------------------------------------

def load_beir(folder: str | Path, split: str = "test") -> tuple[dict[str, str], dict[str, str], dict[str, dict[str, int]]]:
    """Read a BEIR-format folder.

    Layout: ``corpus.jsonl`` (one object per line: ``_id``, ``text``, optional
    ``title``), ``queries.jsonl`` (``_id``, ``text``), and the relevance
    judgements in ``qrels.tsv`` or else ``qrels/<split>.tsv`` (tab-separated,
    header ``query-id  corpus-id  score``, integer scores). Ids are strings.

    A document's text is ``title + " " + text`` when it has a non-empty
    title, as BEIR's sentence-transformers models see it. As BEIR's
    ``GenericDataLoader`` does, only the queries the qrels judge are kept.

    Returns:
        ``(corpus, queries, qrels)``: ``{doc id: text}``, ``{query id: text}``,
        ``{query id: {doc id: relevance}}``.

    Raises:
        DataError (a SlimTuneError): naming the file (and line) when a file is
            missing or empty, a JSON line is malformed or lacks ``_id`` /
            ``text``, an id repeats, a qrels line is malformed, names a query
            or document that does not exist, or no judgement is positive.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"BEIR folder {folder} does not exist", "point at a folder holding corpus.jsonl, queries.jsonl and qrels.tsv")
    corpus = {i: _join_title(obj) for i, obj in _read_jsonl_records(folder / "corpus.jsonl")}
    queries = {i: obj["text"] for i, obj in _read_jsonl_records(folder / "queries.jsonl")}
    qrels_path = _qrels_path(folder, split)
    qrels = _read_qrels(qrels_path, corpus, queries)
    return corpus, {qid: queries[qid] for qid in qrels}, qrels


def _join_title(obj: dict) -> str:
    title = obj.get("title") or ""
    return f"{title} {obj['text']}" if title else obj["text"]


def _qrels_path(folder: Path, split: str) -> Path:
    for path in (folder / "qrels.tsv", folder / "qrels" / f"{split}.tsv"):
        if path.is_file():
            return path
    raise DataError(f"{folder} has no relevance judgements: neither qrels.tsv nor qrels/{split}.tsv exists",
                    "add a tab-separated qrels file with the header: query-id, corpus-id, score")


def _read_jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(id, object)`` per non-blank line of a BEIR corpus or queries file, every object checked."""
    if not path.is_file():
        raise DataError(f"{path} does not exist", f"a BEIR folder needs {path.name}: one JSON object per line with _id and text")
    lines: dict[str, int] = {}
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = _parse_json_line(path, n, line)
            for key in ("_id", "text"):
                if obj.get(key) is None:
                    raise DataError(f"{path} line {n}: no {key!r} (keys: {', '.join(obj) or 'none'})",
                                    "give every line an _id and a text")
            if not isinstance(obj["text"], str):
                raise DataError(f"{path} line {n}: 'text' is {type(obj['text']).__name__}, not a string", "store the text as a JSON string")
            doc_id = str(obj["_id"])
            if doc_id in lines:
                raise DataError(f"{path} line {n}: _id {doc_id!r} repeats line {lines[doc_id]}", "give every line its own _id")
            lines[doc_id] = n
            yield doc_id, obj
    if not lines:
        raise DataError(f"{path} is empty", "write one JSON object per line with _id and text")


def _parse_json_line(path: Path, n: int, line: str) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})", "write one JSON object per line") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} line {n}: a JSON {type(obj).__name__}, not an object", "write one JSON object per line")
    return obj


def _read_qrels(path: Path, corpus: Mapping[str, str], queries: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Judgements from a BEIR qrels TSV, every id checked against the corpus and queries."""
    qrels: dict[str, dict[str, int]] = {}
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            raise DataError(f"{path} is empty", "write the header query-id, corpus-id, score and one judgement per line")
        if [h.strip() for h in header] != QRELS_HEADER:
            raise DataError(f"{path} line 1: header is {header}, expected {QRELS_HEADER} (tab-separated)",
                            "start the file with the line: query-id<TAB>corpus-id<TAB>score")
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            qid, doc_id, score = _qrels_row(path, rows.line_num, row)
            if qid not in queries:
                raise DataError(f"{path} line {rows.line_num}: query-id {qid!r} is not in queries.jsonl",
                                "add the query to queries.jsonl or drop its judgements")
            if doc_id not in corpus:
                raise DataError(f"{path} line {rows.line_num}: corpus-id {doc_id!r} is not in corpus.jsonl",
                                "add the document to corpus.jsonl or drop the judgement")
            if doc_id in qrels.get(qid, {}):
                raise DataError(f"{path} line {rows.line_num}: query-id {qid!r}, corpus-id {doc_id!r} is judged twice",
                                "keep one judgement per pair")
            qrels.setdefault(qid, {})[doc_id] = score
    if not qrels:
        raise DataError(f"{path} has a header but no judgements", "add one line per judged pair: query-id, corpus-id, score")
    if not any(rel > 0 for judged in qrels.values() for rel in judged.values()):
        raise DataError(f"{path} has no relevant document (no judgement with score > 0)", "add judgements with a positive score")
    return qrels


def _qrels_row(path: Path, n: int, row: list[str]) -> tuple[str, str, int]:
    if len(row) != 3:
        raise DataError(f"{path} line {n}: {len(row)} tab-separated fields, expected 3 (query-id, corpus-id, score)",
                        "separate the fields with tabs")
    qid, doc_id, score = (cell.strip() for cell in row)
    try:
        return qid, doc_id, int(score)
    except ValueError:
        raise DataError(f"{path} line {n}: score {score!r} is not an integer", "use integer relevance grades (0, 1, 2, ...)") from None


# --- sentence-pair similarity files ------------------------------------------------------------

def load_similarity(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """Read sentence pairs with gold similarity scores.

    ``.csv`` (comma), ``.tsv`` (tab, quotes taken literally as in STS-B) or
    ``.jsonl`` (one object per line), each with the columns ``text_a``,
    ``text_b`` and ``score``; other columns are ignored.

    Returns:
        ``(text_a, text_b, scores)``: three lists of equal length.

    Raises:
        DataError (a SlimTuneError): naming the file when it is missing, empty
            or of another format, a column is missing (with the columns it
            has), or naming the line when a value is missing or a score is not
            a finite number.
    """
    path = Path(path)
    if path.suffix.lower() not in SIMILARITY_SUFFIXES:
        raise DataError(f"{path}: unknown similarity file format {path.suffix!r}", f"use one of: {', '.join(SIMILARITY_SUFFIXES)}")
    if not path.is_file():
        raise DataError(f"{path} does not exist", "point at a CSV, TSV or JSONL file with text_a, text_b and score")
    rows = _jsonl_rows(path) if path.suffix.lower() == ".jsonl" else _table_rows(path)
    a, b, scores = [], [], []
    for n, row in rows:
        a.append(_cell(path, n, row, "text_a"))
        b.append(_cell(path, n, row, "text_b"))
        scores.append(_score(path, n, row["score"]))
    if not scores:
        raise DataError(f"{path} has no rows", "add sentence pairs with text_a, text_b and score")
    return a, b, scores


def _table_rows(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line, row)`` of a CSV or TSV whose header has the similarity columns."""
    tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        _check_columns(path, reader.fieldnames or [])
        for row in reader:
            if any(v and v.strip() for v in row.values() if isinstance(v, str)):
                yield reader.line_num, row


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = _parse_json_line(path, n, line)
                _check_columns(path, list(row), f" line {n}")
                yield n, row


def _check_columns(path: Path, columns: list[str], where: str = "") -> None:
    missing = [c for c in SIMILARITY_COLUMNS if c not in columns]
    if not columns:
        raise DataError(f"{path} is empty", "write a header with text_a, text_b and score, then one pair per line")
    if missing:
        raise DataError(f"{path}{where}: no column {', '.join(map(repr, missing))}; it has: {', '.join(map(str, columns))}",
                        "name the columns text_a, text_b and score")


def _cell(path: Path, n: int, row: dict, column: str) -> str:
    value = row.get(column)
    if not isinstance(value, str):
        raise DataError(f"{path} line {n}: no {column} value", f"give every row a {column}")
    return value


def _score(path: Path, n: int, value: object) -> float:
    try:
        score = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        score = math.nan
    if not math.isfinite(score):
        raise DataError(f"{path} line {n}: score {value!r} is not a finite number", "give every row a numeric score")
    return score


# --- ranking metrics ---------------------------------------------------------------------------

def mrr_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean reciprocal rank of the first relevant document within the top ``k`` (0 if none is there)."""
    _check_k(k)
    return _mean_over_judged(qrels, lambda qid, relevant: next(
        (1.0 / rank for rank, d in enumerate(run.get(qid, [])[:k], 1) if d in relevant), 0.0))


def recall_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean over queries of the fraction of their relevant documents found in the top ``k``."""
    _check_k(k)
    return _mean_over_judged(qrels, lambda qid, relevant: len(relevant.intersection(run.get(qid, [])[:k])) / len(relevant))


def ndcg_at_k(run: Run, qrels: Qrels, k: int = 10) -> float:
    """Mean normalized discounted cumulative gain at ``k`` (trec_eval's ``ndcg_cut``).

    ``DCG@k = sum_{rank=1..k} gain(doc at rank) / log2(rank + 1)`` with gain the
    qrels relevance (0 for unjudged docs or relevance <= 0); the ideal DCG sorts
    the query's judged relevances, best first, and cuts at ``k``.
    """
    _check_k(k)

    def ndcg(qid: str, relevant: set[str]) -> float:
        judged = qrels[qid]
        gains = [max(judged.get(d, 0), 0) for d in run.get(qid, [])[:k]]
        ideal = sorted((max(r, 0) for r in judged.values()), reverse=True)[:k]
        return _dcg(gains) / _dcg(ideal)

    return _mean_over_judged(qrels, ndcg)


def retrieval_metrics(run: Run, qrels: Qrels) -> dict[str, float]:
    """The BEIR headline numbers: ``mrr@10``, ``ndcg@10``, ``recall@1``, ``recall@10``, ``recall@100``."""
    return {"mrr@10": mrr_at_k(run, qrels, 10), "ndcg@10": ndcg_at_k(run, qrels, 10),
            **{f"recall@{k}": recall_at_k(run, qrels, k) for k in (1, 10, 100)}}


def _dcg(gains: Sequence[float]) -> float:
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, 1))


def _check_k(k: int) -> int:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    return k


def _mean_over_judged(qrels: Qrels, per_query) -> float:
    """Mean of ``per_query(qid, relevant doc ids)`` over the queries with at least one relevant doc."""
    values = []
    for qid, judged in qrels.items():
        relevant = {d for d, rel in judged.items() if rel > 0}
        if relevant:
            values.append(per_query(qid, relevant))
    if not values:
        raise ValueError("the qrels judge no document relevant (relevance > 0)")
    return sum(values) / len(values)


# --- exact search ------------------------------------------------------------------------------

def exact_search(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int,
                 chunk_size: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` corpus rows most cosine-similar to each query, exactly.

    The corpus is scored ``chunk_size`` rows at a time and merged into a
    running top-k, so memory is O(Q * (k + chunk_size)) whatever N is. Scores
    are computed in float32 on the inputs' device. Ties are broken by corpus
    index, lowest first, so the result does not depend on the chunking or on
    how the sort orders equal values. A zero vector has similarity 0 to all.

    Args:
        query_emb: (Q, D) query embeddings.
        corpus_emb: (N, D) corpus embeddings.
        k: results per query; ``min(k, N)`` are returned.
        chunk_size: corpus rows scored at once.

    Returns:
        ``(scores, indices)``, both (Q, min(k, N)): cosine similarities (float32),
        best first, and the corpus row of each (int64).

    Raises:
        ValueError: on shapes that do not match, k or chunk_size below 1, or
            non-finite embeddings.
    """
    _check_search_inputs(query_emb, corpus_emb, k, chunk_size)
    q = F.normalize(query_emb.float(), dim=-1)  # (Q, D)
    top_scores = q.new_empty(q.shape[0], 0)  # (Q, <=k), sorted by (score desc, index asc)
    top_indices = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, corpus_emb.shape[0], chunk_size):
        c = F.normalize(corpus_emb[start:start + chunk_size].float(), dim=-1)  # (C, D)
        scores = q @ c.T  # (Q, C)
        indices = torch.arange(start, start + c.shape[0], device=q.device).expand_as(scores)  # (Q, C)
        # Running entries precede the chunk and have lower indices, so a stable sort keeps ties in index order.
        top_scores, top_indices = _top_k_stable(torch.cat([top_scores, scores], 1), torch.cat([top_indices, indices], 1), k)
    return top_scores, top_indices


def _top_k_stable(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` columns after a stable descending sort of ``scores`` (Q, M); ``indices`` (Q, M) follow."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]  # (Q, min(k, M))
    return scores.gather(1, order), indices.gather(1, order)


def _check_search_inputs(query_emb: torch.Tensor, corpus_emb: torch.Tensor, k: int, chunk_size: int) -> None:
    if query_emb.ndim != 2 or corpus_emb.ndim != 2 or query_emb.shape[1] != corpus_emb.shape[1]:
        raise ValueError(f"need (Q, D) queries and (N, D) corpus, got {tuple(query_emb.shape)} and {tuple(corpus_emb.shape)}")
    if k < 1 or chunk_size < 1:
        raise ValueError(f"k and chunk_size must be at least 1, got k={k}, chunk_size={chunk_size}")
    if not (torch.isfinite(query_emb).all() and torch.isfinite(corpus_emb).all()):
        raise ValueError("embeddings contain NaN or inf")


# --- correlation -------------------------------------------------------------------------------

def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; :func:`scipy.stats.pearsonr` when scipy is installed, else :func:`pearson_numpy`.

    NaN when either input is constant (the correlation is undefined).
    """
    x, y = _pair(a, b)
    stats = _scipy_stats()
    if stats is None or _constant(x) or _constant(y):
        return pearson_numpy(x, y)
    return float(stats.pearsonr(x, y)[0])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); scipy's ``spearmanr`` when installed, else :func:`spearman_numpy`.

    NaN when either input is constant.
    """
    x, y = _pair(a, b)
    stats = _scipy_stats()
    if stats is None or _constant(x) or _constant(y):
        return spearman_numpy(x, y)
    return float(stats.spearmanr(x, y)[0])


def pearson_numpy(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation in float64: ``sum(dx * dy) / sqrt(sum(dx^2) * sum(dy^2))``; NaN if an input is constant."""
    x, y = _pair(a, b)
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else math.nan


def spearman_numpy(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman correlation: Pearson correlation of the average ranks (:func:`average_ranks`)."""
    x, y = _pair(a, b)
    return pearson_numpy(average_ranks(x), average_ranks(y))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span (scipy's ``rankdata`` 'average')."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])  # first position of each tie group
    ends = np.r_[starts[1:], len(x)]  # one past its last
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # mean of ranks start+1..end
    return ranks


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or len(x) < 2:
        raise ValueError(f"need two 1-D sequences of the same length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("correlation inputs contain NaN or inf")
    return x, y


def _constant(x: np.ndarray) -> bool:
    return bool((x == x[0]).all())


def _scipy_stats():
    """``scipy.stats`` when scipy is installed, else None (it is not a SlimTune dependency)."""
    try:
        from scipy import stats
    except ImportError:
        return None
    return stats
