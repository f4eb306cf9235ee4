"""The data of one run: the loaders a task gives a model, built as the data's task kind says.

`TaskData(DataSpec(...), model).loader(kind)` builds, on demand, the loader of a kind: "select" (GPS's two
views of the training split, seeded per image), "train" (training batches) or "eval" (a split,
deterministic, cached after the first pass when the transform is). The transforms follow the
backbone's data config and the spec's image size and preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sparseft.data import data_config, num_classes
from sparseft.data._random import stable_keys
from sparseft.kinds.base import kind_for_data


@dataclass(frozen=True)
class DataSpec:
    """What the loaders of a task need to know: the data, its preprocessing, batches and workers.

    (`sparseft.run.RunSpec.data_spec()` gives the one of a run.)
    """

    data: str
    img_size: int | None = None
    preprocessing: str = "vtab"
    batch_size: int = 32
    eval_batch_size: int = 128
    train_split: str = "train800val200"
    workers: int = 0
    cache_images: bool = True
    seed: int = 0
    drop_last: bool = False  # training and selection loaders drop the last partial batch
    view_scale: float = 0.2  # the selection views' smallest crop (GPS's `view_scale`)


class _HasDataSpec(Protocol):
    def data_spec(self) -> DataSpec: ...


class TensorCache(Dataset):
    """Keeps each transformed sample after its first load (only for deterministic transforms)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.items: list[Any] = [None] * len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        if self.items[i] is None:
            self.items[i] = self.dataset[i]
        return self.items[i]


class SeededViews(Dataset):
    """Sample i's random views drawn from torch's RNG seeded by (seed, i) alone.

    The views then do not depend on the data order, the loader's workers or the number of
    processes sharing the pass (torchvision's transforms in `TwoViews` draw from torch's RNG).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.keys = stable_keys(len(dataset), seed, "selection views")  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> Any:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.keys[i]))
            return self.dataset[i]


class TaskData:
    """The loaders of one task for one model, built on demand by the data's task kind (`sparseft.kinds`)."""

    def __init__(self, spec: DataSpec | _HasDataSpec, model: nn.Module) -> None:
        spec = spec if isinstance(spec, DataSpec) else spec.data_spec()  # a RunSpec gives its own
        self.spec = spec
        self.config = data_config(model)
        self.kind = kind_for_data(spec.data)  # the task kind follows the data
        self.eval_transform, self.train_transform, self.views = self.kind.transforms(self.config, spec)
        self._cache: dict[str, Dataset] = {}

    def dataset(self, split: str, transform: Any, deterministic: bool) -> Dataset:
        key = f"{split}:{id(transform)}"
        if key not in self._cache:
            ds = self.kind.dataset(self.spec.data, split, transform, seed=self.spec.seed)
            self._cache[key] = TensorCache(ds) if (deterministic and self.spec.cache_images) else ds
        return self._cache[key]

    def loader(self, kind: str, split: str | None = None) -> DataLoader:
        """'select': two views of the training split; 'train': training batches; 'eval': a split."""
        s = self.spec
        if kind == "select":
            ds, shuffle, batch = self.kind.selection_dataset(self), True, s.batch_size
        elif kind == "train":
            ds = self.dataset(s.train_split, self.train_transform, self.kind.train_is_fixed(s))
            shuffle, batch = True, s.batch_size
        elif kind == "eval":
            ds, shuffle, batch = self.dataset(split, self.eval_transform, True), False, s.eval_batch_size
        else:
            raise ValueError(f"unknown loader kind {kind!r}")
        generator = torch.Generator().manual_seed(s.seed) if kind == "select" else None
        # workers are re-created every epoch, seeded from the per-epoch RNG: resumed runs stay exact
        return DataLoader(ds, batch_size=batch, shuffle=shuffle, num_workers=s.workers, generator=generator,
                          collate_fn=self.kind.collate(kind), drop_last=s.drop_last and kind != "eval")


def num_classes_of(spec: DataSpec | Any) -> int:
    """The class count of the data a spec (a `DataSpec` or a `RunSpec`) names."""
    return num_classes(spec.data)
