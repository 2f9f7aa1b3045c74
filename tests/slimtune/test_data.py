import pandas as pd
import pytest

from slimtune.data import load_task_data, split_of
from slimtune.errors import DataError
from slimtune.recipe import TaskConfig

from tests.conftest import tiny_texts


def task(data, **kw) -> TaskConfig:
    return TaskConfig(kind=kw.pop("kind", "classification"), data=data, text=kw.pop("text", "review"), label=kw.pop("label", "sentiment"), **kw)


def test_split_is_a_pure_function_of_the_text():
    texts = [f"review number {i}" for i in range(2000)]
    first = [split_of(t) for t in texts]
    assert first == [split_of(t) for t in texts]
    shares = {s: first.count(s) / len(first) for s in ("train", "validation", "test")}
    assert 0.76 < shares["train"] < 0.84 and 0.07 < shares["validation"] < 0.13 and 0.07 < shares["test"] < 0.13


def test_csv_is_split_by_hash_and_labels_indexed(tiny_csv):
    data = load_task_data(task(str(tiny_csv)))
    assert sum(len(data[s]) for s in ("train", "validation", "test")) == 300
    for split in ("train", "validation", "test"):
        assert all(split_of(e["text"]) == split for e in data[split])
    assert data.labels == [0, 1]
    assert {e["label"] for e in data["train"]} == {0, 1}


def test_limit_takes_a_stable_label_mixed_subset(tiny_csv, tmp_path):
    sorted_csv = tmp_path / "sorted.csv"
    pd.read_csv(tiny_csv).sort_values("sentiment").to_csv(sorted_csv, index=False)
    data = load_task_data(task(str(sorted_csv), limit={"train": 40}))
    assert len(data["train"]) == 40
    assert {e["label"] for e in data["train"]} == {0, 1}  # file order would give one class
    again = load_task_data(task(str(sorted_csv), limit=40))
    assert again["train"] == data["train"]


@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet", "tsv"])
def test_other_file_formats(tmp_path, ext, tiny_csv):
    frame = pd.read_csv(tiny_csv)
    path = tmp_path / f"d.{ext}"
    {"jsonl": lambda: frame.to_json(path, orient="records", lines=True), "json": lambda: frame.to_json(path, orient="records"),
     "parquet": lambda: frame.to_parquet(path), "tsv": lambda: frame.to_csv(path, sep="\t", index=False)}[ext]()
    assert load_task_data(task(str(path)))["train"] == load_task_data(task(str(tiny_csv)))["train"]


def test_files_per_split_and_string_labels(tmp_path):
    rows = [(t, "pos" if y else "neg") for t, y in tiny_texts(100)]
    pd.DataFrame(rows[:80], columns=["review", "sentiment"]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[80:], columns=["review", "sentiment"]).to_csv(tmp_path / "test.csv", index=False)
    data = load_task_data(task({"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}))
    assert len(data["test"]) == 20 and data.labels == ["neg", "pos"]
    assert len(data["train"]) + len(data["validation"]) == 80  # validation carved out of train
    assert not {e["text"] for e in data["train"]} & {e["text"] for e in data["validation"]}


def test_bad_data_is_a_clear_error(tiny_csv, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(task(str(tmp_path / "nope.csv")))
    with pytest.raises(DataError, match=r"(?s)no column 'label'.*review"):
        load_task_data(task(str(tiny_csv), label="label"))
    with pytest.raises(DataError, match="hub is offline"):
        load_task_data(task("someone/some-dataset"))
    with pytest.raises(DataError, match="unknown embedded data"):
        load_task_data(task("embedded:sst2"))
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported extension"):
        load_task_data(task(str(tmp_path / "d.xml")))


def test_unreadable_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"review": "ok", "sentiment": 1}\n{not json\n')
    with pytest.raises(DataError, match="cannot read data file"):
        load_task_data(task(str(bad)))
