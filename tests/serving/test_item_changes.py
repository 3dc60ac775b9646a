"""A catalogue change as a request gives it: rows typed as the item table, ids as it
spells them, and every problem named by list, position, column and value."""

from __future__ import annotations

import pytest

from twotower.serving import Artifact
from twotower.serving.item_changes import ChangeError, checked_change


@pytest.fixture(scope="module")
def artifact(demo_artifact) -> Artifact:
    return Artifact.load(demo_artifact[0])


def _row(artifact: Artifact, position: int, **values) -> dict:
    """Item ``position``'s row of the item table, with ``values`` replaced."""
    return {**artifact.items.slice(position, 1).to_pylist()[0], **values}


def test_rows_are_typed_as_the_item_table_and_ids_spelled_as_it_spells_them(artifact):
    known = artifact.item_id_values[4].item()
    rows = [
        _row(artifact, 3, item_id=10_001, price=12),  # a new id; an int for a double
        _row(artifact, 4),  # a known id: replaced
        {
            "item_id": 10_002,
            "category": "c1",
            "price": None,
            "views": 1,
            "genres": "g01",
            "title": None,
        },
    ]
    change = checked_change(artifact, rows, block=["10002", 7, 7], remove=[str(known + 1)])
    assert change.rows.schema == artifact.items.schema
    assert change.rows.column("price").to_pylist() == [12.0, rows[1]["price"], None]
    assert change.rows.column("views").to_pylist()[2] == 1.0
    assert (change.added, change.replaced) == (2, 1)
    assert change.block == [10_002, 7] and change.remove == [known + 1]


# each case: the change, given a whole new row (item id 9001), and what its refusal names
BAD_CHANGES = [
    (lambda whole: {"upsert": [{"category": "c1"}]}, ["upsert[0]: lacks 'item_id', 'price'"]),
    (
        lambda whole: {"upsert": [{**whole, "colour": "red", "size": 3}]},
        ["upsert[0]: unknown column(s) 'colour', 'size'; the item table has 'item_id'"],
    ),
    (
        lambda whole: {"upsert": [{**whole, "price": "cheap"}, {**whole, "views": [1, 2]}]},
        [
            "upsert[0]: feature 'price': 'cheap' is not a valid double",
            "upsert[1]: feature 'views': [1, 2] is not a valid double",
        ],
    ),
    (
        lambda whole: {"upsert": [{**whole, "item_id": 2.5}]},
        ["upsert[0]: feature 'item_id': 2.5 is not a valid int64"],
    ),
    (
        lambda whole: {"upsert": [{**whole, "item_id": None}]},
        ["upsert[0]: the item key 'item_id' is null"],
    ),
    (
        lambda whole: {"upsert": [whole, {**whole, "item_id": 1}, {**whole, "item_id": "9001"}]},
        ["upsert[2]: item id 9001 is also upsert[0]"],
    ),
    (
        lambda whole: {"block": [1, "ghost"], "unblock": [10**6], "remove": [-4]},
        [
            "block: unknown item id(s) 'ghost'",
            "unblock: unknown item id(s) 1000000",
            "remove: unknown item id(s) -4",
        ],
    ),
    (lambda whole: {"block": [3], "unblock": ["3"]}, ["item id(s) both in block and unblock: 3"]),
    (
        lambda whole: {"upsert": [whole], "remove": [9001]},
        ["item id(s) both in upsert and remove: 9001"],
    ),
    (lambda whole: {"block": [5], "remove": [5]}, ["item id(s) both in block and remove: 5"]),
]


@pytest.mark.parametrize(("change", "messages"), BAD_CHANGES)
def test_each_problem_is_named(artifact, change, messages):
    with pytest.raises(ChangeError) as refused:
        checked_change(artifact, **change(_row(artifact, 0, item_id=9001)))
    for message in messages:
        assert message in str(refused.value)


def test_a_new_item_may_be_blocked_in_the_change_that_adds_it(artifact):
    change = checked_change(artifact, [_row(artifact, 0, item_id=777_777)], block=[777_777])
    assert change.block == [777_777] and change.added == 1


def test_a_refusal_names_the_first_problems_and_counts_the_rest(artifact):
    with pytest.raises(ChangeError) as refused:
        checked_change(artifact, upsert=[{"price": "x"}] * 30)
    assert len(refused.value.problems) == 30
    assert str(refused.value).count("upsert[") == 20
    assert str(refused.value).endswith("; and 10 more")
