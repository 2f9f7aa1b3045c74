"""Messy data: empty cells, NaN-like strings, numeric labels, broken rows, other heads.

The rules under test (README, "Your own model and data"): a row whose text or
label is empty (or whitespace-only, JSON null, absent) is skipped and counted
in a warning; every other cell is a value as written ("NA" stays "NA"); label
names are kept as written (integers as ints in numeric order, otherwise
strings, numeric-looking first); a row that cannot be a row is a DataError
naming file, line and column. The fuzzer writes files from records it knows,
so the expected rows and labels come from the records, not from the loader.
"""

import csv
import hashlib
import io
import json
import logging
import random
import re

import pandas as pd
import pytest

from slimtune.cli import main
from slimtune.data import load_task_data
from slimtune.errors import DataError
from slimtune.recipe import TaskConfig

from tests.conftest import recipe_text, tiny_texts


def task(data, **kw) -> TaskConfig:
    return TaskConfig(kind=kw.pop("kind", "classification"), data=str(data), text="review", label="sentiment", **kw)


def all_rows(data) -> list[tuple]:
    return sorted((e["text"], data.labels[e["label"]]) for s in ("train", "validation", "test") for e in data[s])


def write_csv(path, rows, header=("review", "sentiment"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- the reported cases


def test_empty_text_row_is_skipped_and_counted(tmp_path, caplog):
    rows = [(t, y) for t, y in tiny_texts(40)]
    rows[4] = ("", 1)      # line 6 of the file
    rows[9] = ("   ", 0)   # line 11
    path = write_csv(tmp_path / "d.csv", rows)
    with caplog.at_level(logging.WARNING):
        data = load_task_data(task(path))
    assert len(all_rows(data)) == 38
    assert "skipped 2 of 40 rows" in caplog.text and "line 6 ('review' empty)" in caplog.text and "line 11" in caplog.text
    assert str(path) in caplog.text


def test_empty_label_is_skipped_and_labels_keep_their_names(tmp_path, caplog):
    rows = [(t, y) for t, y in tiny_texts(40)]
    rows[2] = (rows[2][0], "")
    with caplog.at_level(logging.WARNING):
        data = load_task_data(task(write_csv(tmp_path / "d.csv", rows)))
    assert data.labels == [0, 1] and all(isinstance(x, int) for x in data.labels)  # not 0.0 / 1.0
    assert "skipped 1 of 40 rows" in caplog.text and "line 4 ('sentiment' empty)" in caplog.text
    assert (rows[2][0], 0) not in all_rows(data) and (rows[2][0], 1) not in all_rows(data)


@pytest.mark.parametrize("written, names", [
    (["2", "10", "1"], [1, 2, 10]),                       # numeric order, not "1" < "10" < "2"
    (["-1", "0", "1"], [-1, 0, 1]),
    (["01", "1", "2"], ["01", "1", "2"]),                 # "01" is no int (it would print back as 1): strings, numeric order
    (["1.5", "10", "neg"], ["1.5", "10", "neg"]),
    (["1.0", "0.0"], ["0.0", "1.0"]),                     # written as floats: kept as written
    (["NA", "None", "nan"], ["NA", "None", "nan"]),       # NaN-like strings are names, not missing values
    (["pos", " pos"], [" pos", "pos"]),                  # exactly as written
])
def test_label_names_as_written(written, names, tmp_path):
    rows = [(f"review number {i}", written[i % len(written)]) for i in range(60)]
    data = load_task_data(task(write_csv(tmp_path / "d.csv", rows)))
    assert data.labels == names
    assert sorted(all_rows(data)) == sorted((t, type(names[0])(y) if isinstance(names[0], int) else y) for t, y in rows)


def test_nan_like_text_is_text(tmp_path):
    rows = [(w, i % 2) for i, w in enumerate(["NA", "nan", "None", "null", "N/A", "#N/A"] * 5)]
    data = load_task_data(task(write_csv(tmp_path / "d.csv", rows)))
    assert len(all_rows(data)) == 30 and {t for t, _ in all_rows(data)} == {"NA", "nan", "None", "null", "N/A", "#N/A"}


@pytest.mark.parametrize("content, message", [
    ("review,sentiment\ngood film,1\nbad, awful film,0\n", "line 3 has 3 cells, the header has 2"),
    ("review,sentiment\n", "has no usable rows"),
    ("", "is empty"),
    ("review,review\na,1\n", "two columns named 'review'"),
    ("text,sentiment\na,1\n", "has no column 'review'"),
])
def test_malformed_csv_is_an_error_naming_file_and_line(content, message, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)) as err:
        load_task_data(task(path))
    assert "bad.csv" in str(err.value) or message == "has no usable rows"


def test_malformed_json_is_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"review": "ok", "sentiment": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl' line 2 is not a JSON object"):
        load_task_data(task(path))
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"review": "ok", "sentiment": 1}, {"review": ["a", "list"], "sentiment": 0}]))
    with pytest.raises(DataError, match=r"d\.json' record 2, column 'review': a JSON list where text belongs"):
        load_task_data(task(path))


def test_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("review,sentiment\ncaf\xe9 film,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_task_data(task(path))


def test_edited_file_is_read_again(tmp_path):
    path = write_csv(tmp_path / "d.csv", [(f"text {i}", i % 2) for i in range(30)])
    assert load_task_data(task(path)).labels == [0, 1]
    write_csv(path, [(f"text {i}", i % 3) for i in range(31)])
    assert load_task_data(task(path)).labels == [0, 1, 2]


# ---------------------------------------------------------------- fuzzing


UNICODE = ["café", "日本語のレビュー", "naïve résumé", "emoji 🎬 ok", "Ωmega"]
NAN_LIKE = ["nan", "NaN", "NA", "N/A", "None", "null", "NULL", "#N/A"]
LABELS = {
    "int": [0, 1, 2, 10, -1],
    "str": ["pos", "neg", "neutral", "положительный", "a,b", 'say "x"'],
    "mixed": [1, "2", "x", "NA", "1.5", 3],
}


def random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.12:
        return rng.choice(["", " ", "  \t ", "\n"])  # empty or whitespace-only: skipped
    if kind < 0.22:
        return rng.choice(NAN_LIKE)
    if kind < 0.32:
        return rng.choice(UNICODE)
    if kind < 0.45:
        return rng.choice(['he said "great"', "comma, inside", "tab\tinside", "line\nbreak", '"quoted"', "trailing space "])
    return " ".join(rng.choice(["good", "bad", "film", "plot", "fine"]) for _ in range(rng.randint(1, 5)))


def random_label(rng: random.Random, pool: list):
    if rng.random() < 0.1:
        return rng.choice(["", "  ", None])
    return rng.choice(pool)


def is_empty(cell) -> bool:
    return cell is None or (isinstance(cell, str) and not cell.strip())


def expected_name(cell):
    """The documented naming, written out independently: integers (as int() prints them) are ints, all else text."""
    if isinstance(cell, int):
        return cell
    text = str(cell)
    return int(text) if text.lstrip("-").isdigit() and str(int(text)) == text else text


def expected_labels(names: set) -> list:
    if all(isinstance(n, int) for n in names):
        return sorted(names)

    def numeric(s):
        try:
            return float(s) if s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "+inf") else None
        except ValueError:
            return None

    texts = {str(n) for n in names}
    nums = sorted((t for t in texts if numeric(t) is not None), key=lambda t: (numeric(t), t))
    return nums + sorted(t for t in texts if numeric(t) is None)


def split_by_hand(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") % 100
    return "train" if bucket < 80 else "validation" if bucket < 90 else "test"


def write_fuzz_file(rng: random.Random, path_stem, fmt: str):
    """Write one random file; return (path, records, defect): the records as meant, and None or (kind, where)."""
    pool = LABELS[rng.choice(list(LABELS))]
    records = [{"review": random_text(rng), "sentiment": random_label(rng, pool)} for _ in range(rng.randint(0, 14))]
    records += [dict(r) for r in rng.sample(records, min(len(records), rng.randint(0, 2)))]  # duplicate rows
    dropped = rng.random() < 0.08  # the label column is left out
    columns = ["review"] + ["sentiment"] * (not dropped)
    path = path_stem.with_suffix("." + fmt)
    if fmt in ("csv", "tsv"):
        path, defect = write_delimited(rng, path, records, columns, fmt)
        return path, records, ("no column", "sentiment") if dropped else defect
    objects = []
    for r in records:
        if rng.random() < 0.05:
            r["review"] = rng.randint(0, 99)  # a number where text belongs: its text
        obj = {c: r[c] for c in columns if not (r[c] is None and rng.random() < 0.5)}  # a null, or the key left out
        objects.append(obj)
    absent = [c for c in ("review", "sentiment") if not any(c in o for o in objects)]
    defect = ("no column", absent[0]) if absent else None
    if fmt == "jsonl":
        if defect is None and objects and rng.random() < 0.05:
            at = rng.randrange(len(objects))
            defect = ("not an object", at + 1)
            objects.insert(at, [1, 2])
        path.write_text("".join(json.dumps(x, ensure_ascii=rng.random() < 0.5) + "\n" for x in objects), encoding="utf-8")
    else:
        path.write_text(json.dumps(objects, indent=rng.choice([None, 2])), encoding="utf-8")
    return path, records, defect


def write_delimited(rng, path, records, columns, fmt):
    """csv/tsv through Python's writer (quoting as needed); sometimes a row with one cell too many. Returns (path, defect)."""
    delimiter = "," if fmt == "csv" else "\t"
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(columns)
    line, defect = 2, None
    for r in records:
        if defect is None and len(columns) == 2 and rng.random() < 0.04:
            defect = ("cells", line)
            out.write(delimiter.join(["x", "1", "extra"]) + "\n")
            line += 1
        before = out.tell()
        writer.writerow(["" if r[c] is None else r[c] for c in columns])
        line += out.getvalue()[before:].count("\n")
    path.write_text(out.getvalue(), encoding="utf-8")
    return path, defect


def check_fuzz_case(path, records, defect, caplog) -> str:
    caplog.clear()
    kept = [r for r in records if not is_empty(r["review"]) and not is_empty(r["sentiment"])]
    try:
        with caplog.at_level(logging.WARNING):
            data = load_task_data(task(path))
    except DataError as err:
        message = str(err)
        assert path.name in message, message
        if defect and defect[0] == "no column":
            assert f"has no column {defect[1]!r}" in message, message
        elif defect and defect[0] == "cells":
            assert f"line {defect[1]} has 3 cells" in message, message
        elif defect and defect[0] == "not an object":
            assert f"line {defect[1]} is not a JSON object" in message, message
        else:  # the only other error: nothing left for train or test
            assert all(split_by_hand(str(r["review"])) == "validation" for r in kept) and "no usable rows" in message, message
        return "error"
    assert defect is None, f"{path.name}: expected an error for {defect}"
    names = {expected_name(r["sentiment"]) for r in kept}
    assert data.labels == expected_labels(names)
    as_label = (lambda x: x) if all(isinstance(n, int) for n in names) else str
    assert all_rows(data) == sorted((str(r["review"]), as_label(expected_name(r["sentiment"]))) for r in kept)
    for split in ("train", "validation", "test"):
        assert all(split_by_hand(e["text"]) == split for e in data[split])
    skipped = len(records) - len(kept)
    assert (f"skipped {skipped} of {len(records)} rows" in caplog.text) == (skipped > 0), caplog.text
    return "loaded"


def test_fuzzed_files_load_exactly_or_fail_clearly(tmp_path, caplog):
    rng = random.Random(12)
    outcomes = {"loaded": 0, "error": 0}
    for i in range(240):
        fmt = ["csv", "tsv", "jsonl", "json"][i % 4]
        path, records, defect = write_fuzz_file(rng, tmp_path / f"f{i}", fmt)
        outcomes[check_fuzz_case(path, records, defect, caplog)] += 1
    assert outcomes["loaded"] > 150 and outcomes["error"] > 10  # both paths were exercised


# ---------------------------------------------------------------- heads and labels of models


def test_a_trained_head_for_other_classes_is_replaced_with_a_notice(tmp_path, tiny_bert, caplog):
    from transformers import AutoConfig, AutoTokenizer, BertForSequenceClassification

    from slimtune.models import load_pretrained

    config = AutoConfig.from_pretrained(tiny_bert, num_labels=2, id2label={0: "NEG", 1: "POS"}, label2id={"NEG": 0, "POS": 1})
    BertForSequenceClassification(config).save_pretrained(tmp_path / "cls")
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(tmp_path / "cls")
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "cls").classifier.weight
    with caplog.at_level(logging.WARNING):
        model, _ = load_pretrained(str(tmp_path / "cls"), "AutoModelForSequenceClassification", num_labels=3)
    assert model.classifier.out_features == 3
    assert "head for 2 classes (NEG, POS) but the data has 3" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        same, _ = load_pretrained(str(tmp_path / "cls"), "AutoModelForSequenceClassification", num_labels=2)
        bare, _ = load_pretrained(str(tiny_bert), "AutoModelForSequenceClassification", num_labels=3)  # no trained head: nothing to say
    assert same.classifier.weight.equal(saved) and bare.classifier.out_features == 3
    assert "classification head" not in caplog.text


def test_labels_changed_since_training(tmp_path, tiny_bert, caplog, capsys):
    """The data gains a class after a run: eval of the old artifact is an error, a rerun recomputes."""
    import shutil

    import slimtune

    data = write_csv(tmp_path / "d.csv", [(t, y) for t, y in tiny_texts(60)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(tiny_bert, data, "- evaluate: {latency: false}\n"))
    first = slimtune.run(recipe, out=tmp_path / "run")
    old = tmp_path / "old"
    shutil.copytree(first.stages[0].path, old)
    write_csv(data, [(t, i % 3) for i, (t, _) in enumerate(tiny_texts(60))])
    assert main(["eval", str(old), "--no-latency"]) == 2
    err = capsys.readouterr().err
    assert "was trained for labels [0, 1], but its data now has labels [0, 1, 2]" in err and "Traceback" not in err
    from slimtune.eval import EvaluateConfig, evaluate_artifact

    with pytest.raises(DataError, match=r"trained for labels \[0, 1\]"):  # the Python API checks too
        evaluate_artifact(slimtune.load(old), EvaluateConfig(latency=False))
    with caplog.at_level(logging.WARNING):
        again = slimtune.run(recipe, out=tmp_path / "run")
    assert not again.stages[0].reused and "made for labels [0, 1]" in caplog.text
    assert slimtune.load(again.stages[0].path).labels == [0, 1, 2]
