"""From cases to batches: cached 3D volumes, 2D training slices taken from them, and data loaders.

Volumes pass once through the dataset's deterministic ``preprocess`` transforms and are cached by MONAI's
``CacheDataset`` (in memory). Training draws 2D slices along the dataset's ``slice_axis`` from the cached volumes
and applies the random 2D ``augment`` transforms to each; evaluation takes whole volumes, one per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.transforms import Compose
from torch.utils.data import Dataset

TRAIN_KEYS = ("image", "label")


def volume_dataset(cases: Sequence[dict], preprocess: Sequence[Callable] | Callable, num_workers: int = 0) -> CacheDataset:
    """Cache the preprocessed volumes of ``cases`` in memory (``copy_cache=False``: consumers must not mutate)."""
    transform = preprocess if isinstance(preprocess, Compose) else Compose(list(preprocess))
    return CacheDataset(
        data=list(cases), transform=transform, cache_rate=1.0, num_workers=num_workers or None,
        copy_cache=False, progress=False,
    )


def _plain(t) -> torch.Tensor:
    """A plain ``torch.Tensor`` view of a tensor, MetaTensor or array (no meta tracking on 2D slices)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class SliceDataset(Dataset):
    """2D slices along ``slice_axis`` of the volumes of a cached volume dataset, with random 2D transforms.

    Each item is ``{"image": C×H×W, "label": 1×H×W}`` as plain tensors (the volume's 3D affine does not apply to a
    slice), plus ``id`` and ``slice``.

    Args:
        volumes: a dataset of dicts with ``image`` ``C×X×Y×Z`` and ``label`` ``1×X×Y×Z``.
        slice_axis: the spatial axis (0, 1 or 2) along which to slice.
        transform: random 2D transforms applied to each slice (e.g. flips, affine, intensity).
        skip_empty: drop slices whose label is background only.
    """

    def __init__(
        self, volumes: Dataset, slice_axis: int = 2, transform: Callable | None = None, skip_empty: bool = False
    ) -> None:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2 (a spatial axis of the volume), got {slice_axis}")
        self.volumes = volumes
        self.axis = slice_axis + 1  # skip the channel axis
        self.transform = transform
        self.index: list[tuple[int, int]] = []
        for v in range(len(volumes)):
            label = volumes[v]["label"]
            n = label.shape[self.axis]
            if skip_empty:
                reduce_dims = [d for d in range(label.ndim) if d != self.axis]
                keep = torch.as_tensor(label).amax(dim=reduce_dims) > 0
                self.index.extend((v, int(s)) for s in torch.nonzero(keep).flatten())
            else:
                self.index.extend((v, s) for s in range(n))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        v, s = self.index[i]
        vol = self.volumes[v]
        item = {k: _plain(vol[k]).select(self.axis, s).clone() for k in TRAIN_KEYS}
        if self.transform is not None:
            item = self.transform(item)
        item = {k: _plain(t) for k, t in item.items()}
        item["id"] = vol.get("id", str(v))
        item["slice"] = s
        return item


def train_loader(
    volumes: Dataset,
    slice_axis: int,
    augment: Sequence[Callable] | Callable | None,
    batch_size: int,
    num_workers: int = 0,
    skip_empty: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Shuffled batches of augmented 2D slices (the generator is seeded for reproducible order)."""
    transform = None if augment is None else (augment if isinstance(augment, Compose) else Compose(list(augment)))
    if transform is not None:
        transform.set_random_state(seed=seed)
    slices = SliceDataset(volumes, slice_axis, transform, skip_empty)
    if len(slices) == 0:
        raise ValueError("no training slice: the training split is empty or every slice was skipped")
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        slices, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=False, generator=generator
    )


def volume_loader(volumes: Dataset, num_workers: int = 0) -> DataLoader:
    """One whole volume per batch, in order."""
    return DataLoader(volumes, batch_size=1, shuffle=False, num_workers=num_workers, collate_fn=list_data_collate)
