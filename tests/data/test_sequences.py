"""The sequence-file adapter on hand-made files, and on the Amazon folders when present."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from twotower.data.config import DataConfig, SplitConfig
from twotower.data.dataset import ITEM_ID, QUERY_ID, TIMESTAMP
from twotower.data.load import load_dataset, with_data_dir
from twotower.data.sequences import load_sequences
from twotower.data.splits import split_interactions
from twotower.errors import DataError

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def write(folder: Path, lines: str, attributes: object | None = None) -> Path:
    path = folder / "Shop.txt"
    path.write_text(lines)
    if attributes is not None:
        text = attributes if isinstance(attributes, str) else json.dumps(attributes)
        (folder / "Shop_item2attributes.json").write_text(text)
    return path


def test_each_line_is_a_users_items_oldest_first(tmp_path):
    path = write(tmp_path, "1 10 11 12\n2 11 13\n3  12   10 11  \n")
    dataset = load_sequences(path)
    rows = dataset.interactions.select([QUERY_ID, ITEM_ID, TIMESTAMP]).to_pylist()
    assert [(r[QUERY_ID], r[ITEM_ID], r[TIMESTAMP]) for r in rows] == [
        (1, 10, 0),
        (1, 11, 1),
        (1, 12, 2),
        (2, 11, 0),
        (2, 13, 1),
        (3, 12, 0),
        (3, 10, 1),
        (3, 11, 2),
    ]
    assert dataset.items.column("item_id").to_pylist() == [10, 11, 12, 13]
    assert dataset.queries.column("user_id").to_pylist() == [1, 2, 3]
    assert dataset.name == "Shop"
    assert "attributes" not in dataset.items.column_names


def test_leave_last_out_holds_out_each_lines_last_and_second_last(tmp_path):
    path = write(tmp_path, "1 10 11 12 13\n2 13 12 11\n")
    dataset = load_sequences(path)
    split = split_interactions(dataset, SplitConfig(method="leave_last_out"))
    for part, expected in (("valid", {(1, 12), (2, 12)}), ("test", {(1, 13), (2, 11)})):
        table = split.part(part)
        pairs = zip(table[QUERY_ID].to_pylist(), table[ITEM_ID].to_pylist(), strict=True)
        assert set(pairs) == expected


def test_attributes_become_an_item_list_column_without_repeats(tmp_path):
    attributes = {"10": [3, 1, 3], "11": [2], "14": [5, 6]}
    path = write(tmp_path, "1 10 11\n2 12 10\n", attributes)
    items = load_sequences(path).items
    # 12 has no entry (no attributes); 14 is in the catalogue though no user has it
    assert items.column("item_id").to_pylist() == [10, 11, 12, 14]
    assert items.column("attributes").to_pylist() == [[3, 1], [2], [], [5, 6]]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ("1 10 11\n\n2 12\n", r"Shop.txt, line 2: a line is a user id, then at least one item"),
        ("1 10 11\n2\n", r"line 2: a line is a user id"),
        ("1 10 11\n2 12 x7 13\n", r"line 2: 'x7' is not an integer id"),
        ("1 10\n2 11\n1 12\n", r"lines 1 and 3: user 1 has two lines"),
    ],
)
def test_a_bad_line_is_named(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_sequences(write(tmp_path, lines))


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ("{not json", r"Shop_item2attributes.json: not a JSON file"),
        ([1, 2], r"expected one object mapping item ids"),
        ({"10": [1], "ten": [2]}, r"item id 'ten' is not an integer"),
        ({"10": [1, "a"]}, r"item 10's attributes \[1, 'a'\] are not a list of integer ids"),
    ],
)
def test_a_bad_attributes_file_is_named(tmp_path, attributes, message):
    with pytest.raises(DataError, match=message):
        load_sequences(write(tmp_path, "1 10 11\n", attributes))


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope.txt: no such sequence file"):
        load_dataset(DataConfig(source="sequences", path=tmp_path / "nope.txt"))


def test_the_sequences_source_reads_the_file_the_config_names(tmp_path):
    path = write(tmp_path, "1 10 11\n2 11 10\n", {"10": [1], "11": [2]})
    dataset = load_dataset(DataConfig(source="sequences", path=path))
    assert dataset.interactions.num_rows == 4
    assert dataset.items.column("attributes").to_pylist() == [[1], [2]]


def test_data_dir_points_an_amazon_source_at_its_folder(tmp_path):
    config = with_data_dir(DataConfig(source="amazon-toys"), tmp_path)
    assert config.path == tmp_path / "amazon-toys"


@pytest.mark.skipif(
    not (DATASETS / "amazon-toys").is_dir(), reason="../shared/datasets/amazon-toys is absent"
)
@pytest.mark.parametrize(
    ("source", "users", "items", "interactions", "attribute_ids"),
    [
        ("amazon-toys", 19_412, 11_924, 167_597, 1_027),
        ("amazon-sports", 35_598, 18_357, 296_337, 2_277),
    ],
)
def test_the_amazon_folders_hold_their_published_counts(
    source, users, items, interactions, attribute_ids
):
    dataset = load_dataset(DataConfig(source=source, path=DATASETS / source))
    assert (dataset.queries.num_rows, dataset.items.num_rows) == (users, items)
    assert dataset.interactions.num_rows == interactions
    attributes = dataset.items.column("attributes").combine_chunks()
    assert len(np.unique(attributes.flatten().to_numpy())) == attribute_ids
    # every item has at least two attributes, none twice
    lengths = attributes.value_lengths().to_numpy()
    assert lengths.min() >= 2
    for row in attributes.to_pylist()[:500]:
        assert len(set(row)) == len(row)
