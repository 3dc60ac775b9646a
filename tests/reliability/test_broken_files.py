"""A corpus of broken inputs through the command line: each gives its clear error (one
line naming the file, the line or column and what was wrong; exit status 2, never a
traceback) or its documented handling (the run goes on and the log says what was done).

The corpus is built here from one small, valid dataset: interactions, user features and
item features as CSV and Parquet, each case breaking one thing.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from twotower.cli import main
from twotower.config import load_config
from twotower.data.dataset import QUERY_ID
from twotower.features.pipeline import FeaturePipeline
from twotower.sources import load_data

USERS, ITEMS = 40, 30


def _interactions() -> pa.Table:
    user = [u for u in range(USERS) for _ in range(6)]
    item = [(u * 7 + j * 3) % ITEMS for u in range(USERS) for j in range(6)]
    time = [u * 100 + j for u in range(USERS) for j in range(6)]
    rating = [1 + (u + j) % 5 for u in range(USERS) for j in range(6)]
    return pa.table({"user_id": user, "item_id": item, "ts": time, "rating": rating})


def _users() -> pa.table:
    return pa.table(
        {
            "user_id": list(range(USERS)),
            "age": [18.0 + u for u in range(USERS)],
            "gender": ["f" if u % 2 else "m" for u in range(USERS)],
        }
    )


def _items() -> pa.Table:
    return pa.table(
        {
            "item_id": list(range(ITEMS)),
            "title": [f"movie number {i}" for i in range(ITEMS)],
            "genres": ["drama|comedy" if i % 2 else "action" for i in range(ITEMS)],
            "price": [float(i % 7) + 0.5 for i in range(ITEMS)],
        }
    )


CONFIG = """\
data:
  source: files
  interactions: {{path: {interactions}, query_id: user_id, item_id: item_id, timestamp: ts,
                 weight: rating{extra}}}
  queries: {{path: {users}, key: user_id}}
  items: {{path: {items}, key: item_id}}
{data_more}split: {{method: leave_last_out}}
features:
  query:
    - {{name: user_id, kind: id, column: user_id, dim: 8}}
    - {{name: age, kind: dense, column: age, transform: standardize}}
    - {{name: gender, kind: onehot, column: gender}}
  item:
    - {{name: item_id, kind: id, column: item_id, dim: 8}}
    - {{name: title, kind: text, column: title, buckets: 256, dim: 8}}
    - {{name: genres, kind: multihot, column: genres, separator: "|"}}
    - {{name: price, kind: dense, column: price, transform: standardize}}
model: {{query: {{kind: mlp, widths: [8]}}, item: {{kind: mlp, widths: [8]}}}}
training: {{epochs: 1, batch_size: 32, tensorboard: false, ks: [5], metric: valid/recall@5}}
"""


def _csv(path: Path, table: pa.Table, delimiter: str = ",") -> Path:
    pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter=delimiter, quoting_style="none"))
    return path


@dataclasses.dataclass
class Case:
    """Breaks one thing in the valid files; ``expect`` is the error's regex, or None
    for a documented handling, checked by ``check`` on the prepared data and the log."""

    damage: Callable[[dict[str, Path]], None] | None = None
    expect: str | None = None
    extra: str = ""
    data_more: str = ""
    check: Callable[[dict, str, Path], None] | None = None


def _write_valid(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return {
        "interactions": _csv(folder / "interactions.csv", _interactions()),
        "users": _csv(folder / "users.csv", _users()),
        "items": _csv(folder / "items.csv", _items()),
    }


def _rewrite(path: Path, edit: Callable[[str], str]) -> None:
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")


def _replace_line(path: Path, number: int, text: str) -> None:
    """Line ``number`` (1-based, the header is line 1) becomes ``text``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _as_parquet(files: dict[str, Path], name: str, table: pa.Table) -> Path:
    path = files[name].with_suffix(".parquet")
    pq.write_table(table, path)
    files[name] = path
    return path


def _truncated_parquet(files: dict[str, Path]) -> None:
    path = _as_parquet(files, "interactions", _interactions())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _parquet_with_text_ids(files: dict[str, Path]) -> None:
    table = _interactions().set_column(0, "user_id", pa.array([f"u{i}" for i in range(240)]))
    _as_parquet(files, "interactions", table)


def _nan_and_inf(files: dict[str, Path]) -> None:
    _replace_line(files["items"], 2, "0,movie number 0,action,nan")
    _replace_line(files["items"], 3, "1,movie number 1,drama|comedy,inf")
    _replace_line(files["users"], 4, "2,-inf,f")


def _unicode_ids(files: dict[str, Path]) -> None:
    def rename(text: str) -> str:
        # ids that hold separators, quotes and non-ASCII letters, quoted as CSV allows
        lines = text.splitlines()
        out = [lines[0]]
        for line in lines[1:]:
            first, rest = line.split(",", 1)
            out.append(f'"ユーザー|{first};x ""q"""' + "," + rest)
        return "\n".join(out) + "\n"

    _rewrite(files["users"], rename)
    _rewrite(files["interactions"], rename)


def _duplicated_rows(files: dict[str, Path]) -> None:
    lines = files["interactions"].read_text().splitlines()
    files["interactions"].write_text("\n".join([*lines, *lines[1:11]]) + "\n")


def _one_interaction_user(files: dict[str, Path]) -> None:
    with files["interactions"].open("a") as f:
        f.write(f"{USERS},3,99999,4\n")
    with files["users"].open("a") as f:
        f.write(f"{USERS},30.0,f\n")


def _items_without_features(files: dict[str, Path]) -> None:
    lines = files["items"].read_text().splitlines()
    files["items"].write_text("\n".join(lines[:-5]) + "\n")  # items 25..29 lose their rows


def _prepared(summary: dict, log: str, config: Path) -> None:
    assert summary["train"] + summary["valid"] + summary["test"] == summary["interactions"]


def _check_non_finite(summary: dict, log: str, config: Path) -> None:
    """nan, inf and -inf are missing: value 0 and the missing flag set."""
    _prepared(summary, log, config)
    dataset, split = load_data(load_config(config))
    pipeline = FeaturePipeline.fit(load_config(config).features, dataset, split.train)
    price = pipeline.transform("item", dataset.items)["price"].numpy()
    age = pipeline.transform("query", dataset.queries)["age"].numpy()
    assert price[:2].tolist() == [[0.0, 1.0], [0.0, 1.0]] and price[2:, 1].sum() == 0
    assert age[2].tolist() == [0.0, 1.0] and np.isfinite(price).all() and np.isfinite(age).all()


def _check_duplicates(summary: dict, log: str, config: Path) -> None:
    assert summary["interactions"] == USERS * 6 + 10  # kept: a repeat is an event too
    _prepared(summary, log, config)


def _check_one_interaction(summary: dict, log: str, config: Path) -> None:
    assert summary["queries"] == USERS + 1
    _prepared(summary, log, config)
    _, split = load_data(load_config(config))
    counts = {
        part: int(np.sum(split.part(part).column(QUERY_ID).to_numpy() == USERS))
        for part in ("train", "valid", "test")
    }
    assert counts == {"train": 1, "valid": 0, "test": 0}  # nothing held out


def _check_dropped_items(summary: dict, log: str, config: Path) -> None:
    dropped = sum(i >= ITEMS - 5 for i in _interactions().column("item_id").to_pylist())
    assert f"dropped {dropped} interaction(s) of 5 item id(s) that have no row" in log, log
    assert summary["interactions"] == USERS * 6 - dropped
    assert summary["items"] == ITEMS - 5
    _prepared(summary, log, config)


CASES = {
    "truncated parquet": Case(_truncated_parquet, r"interactions\.parquet: not a readable Parquet"),
    "truncated csv line": Case(
        lambda f: _rewrite(f["interactions"], lambda t: t.rstrip("\n")[:-4]),
        r"interactions\.csv, line 241: wrong number of fields \(expected the header's\): "
        r"'39,18,39'",
    ),
    "wrong delimiter": Case(
        lambda f: _csv(f["interactions"], _interactions(), delimiter=";"),
        r"interactions\.csv: column\(s\) 'user_id', .* not found; .*the header is one column "
        r"holding ';': is the delimiter ';' rather than ','\?",
    ),
    "text in a number column": Case(
        lambda f: _replace_line(f["interactions"], 7, "1,5,yesterday,3"),
        r"interactions\.csv, line 7, column 'ts' \(the timestamp\): 'yesterday' is not a number",
    ),
    "ids of another type": Case(
        _parquet_with_text_ids,
        r"interactions\.parquet: interaction row 0 \(0-based\): query_id 'u0' is string, and "
        r"the query feature table's keys are int64",
    ),
    "empty interactions file": Case(
        lambda f: f["interactions"].write_text(""), r"interactions\.csv: the file is empty"
    ),
    "header but no rows": Case(
        lambda f: f["interactions"].write_text("user_id,item_id,ts,rating\n"),
        r"interactions\.csv: the table has no rows",
    ),
    "empty string ids": Case(
        lambda f: _replace_line(f["interactions"], 5, ",4,3,2"),
        r"interactions\.csv: 1 interaction\(s\) have an empty query_id; the first is "
        r"interaction row 3 \(0-based",
    ),
    "a missing timestamp": Case(
        lambda f: _replace_line(f["interactions"], 9, "1,4,,2"),
        r"interactions\.csv: 1 interaction\(s\) have no timestamp \(column 'ts'\); the first "
        r"is on line 9",
    ),
    "NaN and inf in dense features": Case(_nan_and_inf, check=_check_non_finite),
    "ids with unicode, quotes and separators": Case(_unicode_ids, check=_prepared),
    "duplicated rows": Case(_duplicated_rows, check=_check_duplicates),
    "a user with one interaction": Case(_one_interaction_user, check=_check_one_interaction),
    "items with no features, refused": Case(
        _items_without_features, r"5 item id\(s\).*no row in the item feature table.*on_missing"
    ),
    "items with no features, dropped": Case(
        _items_without_features, data_more="  on_missing_rows: drop\n", check=_check_dropped_items
    ),
}


def _cli(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["twotower", *args])
    try:
        main()
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", list(CASES))
def test_broken_input_gives_its_clear_error_or_documented_handling(
    name, tmp_path, monkeypatch, capsys, caplog
):
    case = CASES[name]
    files = _write_valid(tmp_path / "data")
    if case.damage is not None:
        case.damage(files)
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG.format(
            **{k: str(v) for k, v in files.items()}, extra=case.extra, data_more=case.data_more
        )
    )
    code, out, err = _cli(
        ["data", "prepare", str(config), "--out", str(tmp_path / "f")], monkeypatch, capsys
    )
    assert "Traceback" not in err
    if case.expect is not None:
        assert code == 2, err
        (message,) = [line for line in err.splitlines() if line.startswith("error: ")]
        assert re.search(case.expect, message), message
        return
    assert code == 0, err
    case.check(json.loads(out), err + caplog.text, config)
    code, _, err = _cli(["train", str(config), "--out", str(tmp_path / "run")], monkeypatch, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(v == v for v in metrics.values())  # no NaN reached the metrics


def test_the_valid_corpus_itself_prepares_and_trains(tmp_path, monkeypatch, capsys):
    """The oracle for the cases above: unbroken, the same files go through."""
    files = _write_valid(tmp_path / "data")
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG.format(**{k: str(v) for k, v in files.items()}, extra="", data_more="")
    )
    code, out, err = _cli(
        ["data", "prepare", str(config), "--out", str(tmp_path / "f")], monkeypatch, capsys
    )
    assert code == 0, err
    assert json.loads(out)["interactions"] == USERS * 6
