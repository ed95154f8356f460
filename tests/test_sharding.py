"""Each process's share of the data: volume partitions, the equal-length epoch-seeded sampler, the no-volume
iterable, and a one-process run that changes nothing (two processes: ``test_collectives.py``)."""

from __future__ import annotations

import pytest
import torch

from pipeline.collectives import broadcast_text, gather_in_rank_order, mean_across
from pipeline.data.sharding import (
    NoVolumes,
    ShardSampler,
    cases_to_cache,
    chunk,
    chunk_bounds,
    round_robin,
    sample_seed,
    samples_per_process,
)
from pipeline.distributed import DistributedRun, NullTracker, process_seed

CHUNK_CASES = [  # (n, world size, expected chunks)
    (5, 2, [[0, 1, 2], [3, 4]]),
    (1, 2, [[0], []]),
    (0, 3, [[], [], []]),
    (7, 3, [[0, 1, 2], [3, 4], [5, 6]]),
    (2, 4, [[0], [1], [], []]),
]


@pytest.mark.parametrize("n,world,expected", CHUNK_CASES)
def test_chunks_are_contiguous_unpadded_and_in_order(n, world, expected):
    items = list(range(n))
    got = [chunk(items, r, world) for r in range(world)]
    assert got == expected
    assert [i for part in got for i in part] == items  # rank order gives back the sequence, nothing twice
    assert [chunk_bounds(n, r, world)[1] - chunk_bounds(n, r, world)[0] for r in range(world)] == [len(e)
                                                                                                 for e in expected]


def test_round_robin_gives_disjoint_covering_shares():
    items = [f"v{i}" for i in range(7)]
    shares = [round_robin(items, r, 3) for r in range(3)]
    assert shares == [["v0", "v3", "v6"], ["v1", "v4"], ["v2", "v5"]]
    assert sorted(v for s in shares for v in s) == sorted(items)


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_bad_rank_is_refused_naming_it(rank, world):
    with pytest.raises(ValueError, match=rf"rank must be in \[0, {world}\).*got {rank}"):
        chunk_bounds(3, rank, world)


def test_cases_to_cache_per_split():
    cases = [{"id": f"c{i}"} for i in range(5)]
    ids = lambda split, r: [c["id"] for c in cases_to_cache(split, cases, r, 2)]  # noqa: E731
    assert ids("train", 0) == ["c0", "c2", "c4"] and ids("train", 1) == ["c1", "c3"]
    assert ids("val", 0) == [c["id"] for c in cases]  # rank 0 keeps them all for the post-hoc calibration
    assert ids("val", 1) == ["c3", "c4"]
    assert ids("test", 0) == [c["id"] for c in cases] and ids("test", 1) == []
    assert cases_to_cache("train", cases, 0, 1) == cases
    with pytest.raises(ValueError, match="the training split has 1 volume.*fewer than the 2 processes"):
        cases_to_cache("train", cases[:1], 0, 2)


def test_sampler_draws_the_same_number_per_process_shuffled_per_epoch():
    total = samples_per_process([12, 6])
    assert total == 9
    big, small = ShardSampler(12, total, seed=3, rank=0), ShardSampler(6, total, seed=3, rank=1)
    assert len(big) == len(small) == 9 == len(list(big)) == len(list(small))
    assert len(set(big)) == 9  # more slices than draws: no repeat within the epoch
    drawn = list(small)
    assert sorted(set(drawn)) == list(range(6)) and len(drawn) == 9  # fewer: all of them, then 3 repeated
    first = list(big)
    assert list(big) == first  # the same epoch draws the same order
    big.set_epoch(1)
    assert list(big) != first
    big.set_epoch(0)
    assert list(big) == first
    assert sample_seed(3, 0, 1) != sample_seed(3, 1, 1) != sample_seed(4, 1, 1)


def test_sampler_covers_every_slice_over_epochs_when_it_leaves_some_out():
    s = ShardSampler(10, 7, seed=0, rank=0)
    seen = set()
    for epoch in range(6):
        s.set_epoch(epoch)
        seen |= set(s)
    assert seen == set(range(10))


def test_sampler_refuses_a_process_without_slices():
    with pytest.raises(ValueError, match="process 1 has no training slice"):
        ShardSampler(0, 4, rank=1)


def test_no_volumes_has_no_length_and_no_item():
    assert list(NoVolumes()) == []
    with pytest.raises(TypeError):
        len(NoVolumes())


def test_one_process_changes_nothing():
    run = DistributedRun.start("cpu")
    assert (run.rank, run.world_size, run.is_primary, run.distributed) == (0, 1, True, False)
    cases = [{"id": "a"}, {"id": "b"}]
    assert run.share("train", cases) == cases and run.share("test", cases) == cases
    assert run.same_text("name") == "name"
    net = torch.nn.Conv2d(1, 1, 1)
    assert run.wrap(net, seed=0, find_unused_parameters=True) is net
    assert run.params() == {"world_size": 1} and run.finish_training() is True
    assert gather_in_rank_order([1, 2]) == [1, 2] and mean_across({"a": 2.0}) == {"a": 2.0}
    assert broadcast_text("x") == "x" and process_seed(5, 0) == 5 and process_seed(5, 1) != 5


def test_null_tracker_accepts_every_call():
    with NullTracker("experiment", "name", tags={}) as tracker:
        tracker.log_params({"a": 1})
        tracker.engine_handler().attach(object())
        tracker.log_metrics({"x": 1.0}, step=2)
        assert tracker.run_id is None


def test_each_process_caches_its_share_and_sizes_auto_cache_by_its_share_of_memory(tmp_path, monkeypatch):
    import pipeline.data.prepare as prepare
    from pipeline.config import load_config
    from tests.helpers import make_config_dir, tiny_unet_overrides, write_blob_volumes

    root, config_dir = write_blob_volumes(tmp_path / "data"), make_config_dir(tmp_path)
    parser = load_config("blobs", "ce", "unet", config_dir=config_dir, overrides={
        "data_dir": str(root), "cache": "auto", "cache_dir": str(tmp_path / "cache"), **tiny_unet_overrides()})
    estimated = []
    monkeypatch.setattr(prepare, "estimate_cache_bytes", lambda cases, pre: estimated.append(len(cases)) or 100)
    monkeypatch.setattr(prepare, "available_memory", lambda: 300)  # half of it fits 100 bytes; a quarter does not
    alone = prepare.prepare_data(parser)
    assert alone.cache == "memory" and estimated == [6]
    rank1 = DistributedRun(rank=1, world_size=2, local_rank=1, local_world_size=2)
    shared = prepare.prepare_data(parser, rank1.share, rank1.local_world_size)
    assert shared.cache == "disk" and estimated[-1] == 1  # its training volume case01; its validation chunk is empty
    assert shared.cases == alone.cases and shared.split == alone.split  # the whole split, for ids and counts
    assert {k: len(v) for k, v in shared.volumes.items()} == {"train": 1}
    assert shared.volumes["train"].cases[0]["id"] == "case01"
