"""The Parquet stream: every row exactly once per epoch across ranks and workers."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from twotower.data.stream import ParquetStream, shard_bounds
from twotower.errors import DataError


@pytest.fixture
def folder(tmp_path):
    """1,000 rows with a unique ``row`` column, in 3 files of uneven row groups."""
    rows = np.arange(1000)
    cuts = [0, 370, 371, 1000]  # a one-row file too
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        table = pa.table({"row": rows[a:b], "value": rows[a:b] * 2.0})
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=97)
    return tmp_path


def test_shard_bounds_split_evenly_and_cover_everything():
    assert shard_bounds(10, 3) == [0, 4, 7, 10]
    assert shard_bounds(1, 2) == [0, 1, 1]
    for count in range(0, 30):
        for parts in range(1, 6):
            bounds = shard_bounds(count, parts)
            sizes = np.diff(bounds)
            assert bounds[0] == 0 and bounds[-1] == count
            assert sizes.max() - sizes.min() <= 1


@pytest.mark.parametrize("parts", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("seed", [None, 0, 5])
def test_shares_hold_every_row_exactly_once(folder, parts, seed):
    stream = ParquetStream(folder, ["row"])
    assert stream.num_rows == 1000
    read = []
    for part in range(parts):
        pieces = stream.share(seed, part, parts)
        rng = None if seed is None else np.random.default_rng([seed, part])
        batches = list(stream.batches(pieces, 64, buffer_rows=200, rng=rng))
        assert all(b.num_rows == 64 for b in batches[:-1])
        got = np.concatenate([b.column("row").to_numpy() for b in batches])
        assert len(got) == stream.share_rows(parts)[part]
        read.append(got)
    everything = np.concatenate(read)
    assert np.array_equal(np.sort(everything), np.arange(1000))
    if seed is None and parts == 1:
        assert np.array_equal(everything, np.arange(1000))  # stored order kept


def test_the_shuffle_changes_with_the_epoch_and_mixes_beyond_a_row_group(folder):
    stream = ParquetStream(folder, ["row"])

    def epoch(seed):
        pieces = stream.share(seed, 0, 1)
        tables = stream.batches(pieces, 50, 300, np.random.default_rng(seed))
        return np.concatenate([t.column("row").to_numpy() for t in tables])

    a, b = epoch(1), epoch(2)
    assert not np.array_equal(a, b)
    assert np.array_equal(epoch(1), a)  # the same seed, the same order
    first = a[:50]
    groups = {int(r) // 97 for r in first}  # row groups are 97 rows (per file)
    assert len(groups) > 1


def test_dataloader_workers_and_ranks_read_each_row_once(folder):
    stream = ParquetStream(folder, ["row"])

    class Share(torch.utils.data.IterableDataset):
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            part = self.rank * info.num_workers + info.id
            pieces = stream.share(3, part, self.world * info.num_workers)
            for table in stream.batches(pieces, 32, 100, np.random.default_rng(part)):
                yield torch.from_numpy(table.column("row").to_numpy().copy())

    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(Share(rank, 2), batch_size=None, num_workers=2)
        seen += [batch for batch in loader]
    rows = torch.cat(seen).numpy()
    assert np.array_equal(np.sort(rows), np.arange(1000))


def test_bad_folders_say_what_is_wrong(tmp_path, folder):
    with pytest.raises(DataError, match="nothing: no such file or folder"):
        ParquetStream(tmp_path / "nothing", ["row"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no .parquet files"):
        ParquetStream(empty, ["row"])
    with pytest.raises(DataError, match="lacks column.*'user'"):
        ParquetStream(folder, ["row", "user"])
    pq.write_table(pa.table({"row": ["x"], "value": [1.0]}), folder / "part-9.parquet")
    with pytest.raises(DataError, match="part-9.parquet: column.*'row'.*string"):
        ParquetStream(folder, ["row"])
    (folder / "part-9.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="part-9.parquet: not a readable Parquet file"):
        ParquetStream(folder, ["row"])
