"""Caching: in memory (CacheDataset) or on disk (memory-mapped, slice-major), chosen by a flag or automatically."""

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.loading import (
    DiskVolumeCache,
    SliceDataset,
    choose_cache,
    estimate_cache_bytes,
    volume_dataset,
)
from pipeline.data.prepare import prepare_data
from pipeline.registry import UnknownNameError
from tests.datasets_helpers import TINY, write_tiny


@pytest.fixture(scope="module")
def hippo(tmp_path_factory):
    root = write_tiny("hippocampus", tmp_path_factory.mktemp("hippo") / "data")
    parser = load_config("hippocampus", overrides={"data_dir": str(root), **TINY["hippocampus"]["over"]})
    cases = parser.get_parsed_content("dataset")["source"].cases()
    return parser, cases, parser.get_parsed_content("preprocess")


def test_disk_cache_gives_the_same_volumes_and_slices_as_the_memory_cache(hippo, tmp_path):
    _, cases, preprocess = hippo
    mem = volume_dataset(cases, preprocess, cache="memory")
    disk = volume_dataset(cases, preprocess, cache="disk", cache_dir=tmp_path, slice_axis=1)
    assert isinstance(disk, DiskVolumeCache) and len(disk) == len(mem) == 3
    for i in range(3):
        a, b = mem[i], disk[i]
        assert a["id"] == b["id"]
        for k in ("image", "label"):
            assert torch.equal(a[k].as_tensor(), b[k].as_tensor()), k
            assert torch.equal(a[k].affine, b[k].affine)
    for skip in (False, True):
        sm, sd = SliceDataset(mem, 1, skip_empty=skip), SliceDataset(disk, 1, skip_empty=skip)
        assert sd.sliced and sm.index == sd.index
        for i in range(0, len(sm), 3):
            for k in ("image", "label"):
                assert torch.equal(sm[i][k], sd[i][k])


def test_disk_slices_are_read_from_a_mapped_file_opened_once_per_volume(hippo, tmp_path, monkeypatch):
    _, cases, preprocess = hippo
    disk = volume_dataset(cases, preprocess, cache="disk", cache_dir=tmp_path, slice_axis=2)
    calls = []
    real_load = torch.load

    def counting_load(path, *args, **kwargs):
        calls.append(kwargs.get("mmap"))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(DiskVolumeCache, "__getitem__", lambda self, i: pytest.fail("whole volume loaded"))
    slices = SliceDataset(disk, 2)
    order = torch.randperm(len(slices), generator=torch.Generator().manual_seed(0)).tolist()
    for i in order:
        item = slices[i]
        assert item["image"].shape == (1, 16, 16)
    assert calls == [True] * len(cases)  # each volume mapped once, whatever the slice order


def test_disk_cache_files_are_reused_and_renewed_when_preprocessing_changes(hippo, tmp_path):
    _, cases, preprocess = hippo
    volume_dataset(cases, preprocess, cache="disk", cache_dir=tmp_path, key="a")
    files = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")}
    assert len(files) == 3 and not list(tmp_path.glob("*.tmp"))
    volume_dataset(cases, preprocess, cache="disk", cache_dir=tmp_path, key="a")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.pt")} == files
    volume_dataset(cases, preprocess, cache="disk", cache_dir=tmp_path, key="b")
    assert len(list(tmp_path.glob("*.pt"))) == 6


def test_choose_cache():
    assert choose_cache("memory", 10 << 30, 1 << 30) == "memory"
    assert choose_cache("disk", 1, 1 << 30) == "disk"
    assert choose_cache("auto", 1 << 30, 4 << 30) == "memory"
    assert choose_cache("auto", 3 << 30, 4 << 30) == "disk"
    assert choose_cache("auto", 3 << 30, 4 << 30, fraction=0.9) == "memory"
    with pytest.raises(UnknownNameError, match="Did you mean 'disk'"):
        choose_cache("dsik", 1, 1)


def test_estimate_from_headers_matches_the_cache(hippo):
    _, cases, preprocess = hippo
    actual = sum(v.numel() * v.element_size() for i in range(3)
                 for v in volume_dataset(cases, preprocess)[i].values() if isinstance(v, torch.Tensor))
    assert estimate_cache_bytes(cases, preprocess) == pytest.approx(actual, rel=0.3)


def test_auto_cache_goes_to_disk_when_the_data_would_not_fit(hippo, tmp_path):
    parser, _, _ = hippo
    parser = load_config("hippocampus", overrides={
        "data_dir": parser["data_dir"], "cache": "auto", "cache_memory_fraction": 1e-12,
        "cache_dir": str(tmp_path / "cache"), **TINY["hippocampus"]["over"]})
    data = prepare_data(parser)
    assert data.cache == "disk" and data.cache_estimate_bytes > 0
    assert isinstance(data.volumes["train"], DiskVolumeCache)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 3


def test_memory_cache_lays_volumes_out_slice_major(hippo):
    _, cases, preprocess = hippo
    for axis in (1, 2):  # (with one channel, axis 0 outermost is the usual layout)
        vol = volume_dataset(cases, preprocess, cache="memory", slice_axis=axis)[0]["image"]
        assert vol.shape == (1, 16, 16, 10)
        assert vol.select(axis + 1, 3).is_contiguous() and not vol.is_contiguous()
        assert torch.equal(vol.as_tensor(), vol.as_tensor().contiguous())
        assert vol.pixdim.tolist() == [1.0, 1.0, 1.0]
