"""A dataset loaded, preprocessed and moved to the device, consistent with an artifact."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from mctool.core.allocator import release_free_memory
from mctool.store import DatasetMeta
from mctool.data.datasets import (Dataset, Preprocessing, dataset_present, default_data_dir, fit_preprocessing,
                                  load_dataset)
from mctool.core.errors import UsageError
from mctool.core.progress import SILENT, Reporter


@dataclass
class Prepared:
    """Train/test tensors on the device in the preprocessed (whitened/normalised) space."""

    dataset: Dataset
    prep: Preprocessing
    meta: DatasetMeta
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def _cache_dir(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()) / "cache"


def prepare(name: str, data_dir: Path | None, zca: bool, zca_eps: float, device: torch.device,
            download: bool = False) -> Prepared:
    """Load dataset `name` (downloading it first if asked and missing), fit its preprocessing
    (ZCA cached on disk) and move it to `device`."""
    ds = load_dataset(name, data_dir, download=download)
    prep = fit_preprocessing(ds, zca=zca, eps=zca_eps, device=device, cache_dir=_cache_dir(data_dir))
    meta = DatasetMeta(
        name=ds.name, num_classes=ds.num_classes, channels=ds.channels, height=ds.height, width=ds.width,
        zca=zca, zca_eps=zca_eps, mean=tuple(ds.mean), std=tuple(ds.std), class_names=tuple(ds.class_names),
        train_fingerprint=ds.fingerprint(), flip=ds.flip,
    )
    prepared = Prepared(
        dataset=ds, prep=prep, meta=meta,
        train_x=prep.apply(ds.train_images, device=device), train_y=ds.train_labels.to(device),
        test_x=prep.apply(ds.test_images, device=device), test_y=ds.test_labels.to(device),
    )
    release_free_memory()  # decoding and ZCA temporaries are not needed again
    return prepared


def prepare_like(meta: DatasetMeta, data_dir: Path | None, device: torch.device,
                 reporter: Reporter = SILENT) -> Prepared:
    """The same data and preprocessing an artifact was made with; refuses a different training
    split. Says so on `reporter` first: loading (and a first ZCA fit) can take minutes."""
    if not dataset_present(meta.name, data_dir):
        load_dataset(meta.name, data_dir)  # raises: not found, and where to put the files
    reporter.log(f"loading {meta.name}" + (" and fitting ZCA (cached after the first time)" if meta.zca else ""))
    prepared = prepare(meta.name, data_dir, meta.zca, meta.zca_eps, device)
    if prepared.meta.train_fingerprint != meta.train_fingerprint:
        raise UsageError(
            f"dataset '{meta.name}' on this machine differs from the one the artifact was made with "
            f"(fingerprint {prepared.meta.train_fingerprint} != {meta.train_fingerprint})"
        )
    return prepared


def sample_per_class(labels: torch.Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of `per_class` distinct random examples of each class, class-major (CPU int64)."""
    y = labels.cpu()
    picks = []
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        if idx.numel() < per_class:
            raise UsageError(f"class {c} has only {idx.numel()} training images, fewer than the {per_class} asked for")
        picks.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]])
    return torch.cat(picks)


def auto_val_size(num_train: int) -> int:
    """The default validation split: 10 % of the training split, at most 5000 images."""
    return min(5000, num_train // 10)


def split_validation(labels: torch.Tensor, num_classes: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hold out about `size` training images, the same share of every class, chosen by `seed`:
    (indices kept for training, validation indices), both sorted, CPU int64."""
    y = labels.cpu()
    gen = torch.Generator().manual_seed(int(seed) ^ 0x5A1D)
    keep, held = [], []
    total = max(1, y.numel())
    for c in range(num_classes):
        idx = torch.nonzero(y == c).flatten()
        take = min(idx.numel() - 1, round(size * idx.numel() / total)) if idx.numel() > 1 else 0
        order = idx[torch.randperm(idx.numel(), generator=gen)]
        held.append(order[:take])
        keep.append(order[take:])
    return torch.cat(keep).sort().values, torch.cat(held).sort().values
