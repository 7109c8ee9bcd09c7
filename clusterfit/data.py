"""Datasets with a stable index order that artifacts refer to.

Sources (`DATA.<SPLIT>.DATA_SOURCES`):
- `disk_folder`: an ImageFolder tree `<root>/<class>/<image>`, local or an `s3://` prefix; classes
  and files sorted, as torchvision's ImageFolder orders them.
- `disk_filelist`: a text file, one `path[,label]` per line (paths relative to the list's folder, or
  absolute; blank lines and lines starting with # skipped). Both file-based sources, how their files
  are listed and read and what makes an image unusable, are in clusterfit/image_files.py.
- `mnist_idx`: a folder (or `s3://` prefix) of MNIST-format IDX files: Fashion-MNIST, MNIST, KMNIST
  (clusterfit/idx.py); TRAIN is `train-*`, TEST `t10k-*`.
- `digits`: scikit-learn's bundled 8x8 handwritten digits (real images, no download), upsampled to
  RGB; TRAIN is every index with i % 5 != 0, TEST the rest.
- `synthetic`: deterministic random images with 10 classes, for tests.

`DATA.<SPLIT>.DATA_LIMIT` keeps N images chosen by `DATA_LIMIT_SAMPLING` (VISSL's seeded draw by
default for folders and file lists), in dataset order. A TEST folder's class ids are TRAIN's, so a
class missing from TEST shifts nothing. `images_identity` is what label files are checked against.

Every item is `(image_tensor, dataset_index, problem)`: `problem` is "" for an image that was read, and
for one that cannot be used (clusterfit/image_files.py: a link out of the dataset root, a dangling link,
a FIFO, an empty, truncated or non-image file...) its reason, with a blank image, when
`DATA.ON_BAD_IMAGE: skip`; otherwise such an image raises `BadImageError` naming the file and the reason.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from clusterfit.config import Config, DataSplitConfig, TransformsConfig
from clusterfit.idx import IdxSource
from clusterfit.image_files import BadImageError, DatasetError, filelist_source, folder_source
from clusterfit.storage import open_store

log = logging.getLogger(__name__)
# DATA_LIMIT_SAMPLING.METHOD auto: VISSL's random draw where the dataset order is by class or by a list
# someone wrote; digits and synthetic are class-mixed already and keep their nested first-N subsets.
RANDOM_LIMIT_SOURCES = ("disk_folder", "disk_filelist", "mnist_idx")


class ImageSource(Protocol):
    @property
    def targets(self) -> np.ndarray | None:
        """Ground-truth class per index (int64), when known."""

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...
    def name(self, index: int) -> str: ...
    def key(self, index: int) -> str:
        """The image's name relative to the dataset root (where the data lives left out): what the dataset's
        identity and the realignment of VISSL's label files go by."""


@dataclass
class DigitsSource:
    partition: str
    image_size: int

    def __post_init__(self) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        index = np.arange(len(digits.images))
        keep = index % 5 == 0 if self.partition == "TEST" else index % 5 != 0
        self.images = (digits.images[keep] * (255.0 / 16.0)).astype(np.uint8)
        self.targets = digits.target[keep].astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        gray = Image.fromarray(self.images[index], mode="L").resize(
            (self.image_size, self.image_size), Image.Resampling.BILINEAR
        )
        return gray.convert("RGB")

    def name(self, index: int) -> str:
        return f"digits[{self.partition}][{index}]"

    def key(self, index: int) -> str:
        return self.name(index)


@dataclass
class SyntheticSource:
    size: int
    image_size: int
    seed: int
    partition: str = "TRAIN"

    def __post_init__(self) -> None:
        self.targets = (np.arange(self.size) % 10).astype(np.int64)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Image.Image:
        offset = 0 if self.partition == "TRAIN" else 1_000_003
        rng = np.random.default_rng([self.seed, offset + index])
        label = int(self.targets[index])
        base = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256], dtype=np.float32)
        pixels = base + rng.normal(0, 40, (self.image_size, self.image_size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")

    def name(self, index: int) -> str:
        return f"synthetic[{self.partition}][{index}]"

    def key(self, index: int) -> str:
        return self.name(index)


def train_class_list(cfg: Config) -> tuple[list[str], str] | None:
    """TRAIN's classes and where they come from, when TRAIN is a folder tree (None otherwise)."""
    train = cfg.split("TRAIN")
    if train.source != "disk_folder" or len(train.DATA_PATHS) != 1:
        return None
    origin = f"DATA.TRAIN.DATA_PATHS={train.DATA_PATHS[0]}"
    return folder_source(train.DATA_PATHS[0], cfg, "DATA.TRAIN.DATA_PATHS").classes, origin


def build_source(cfg: Config, partition: str) -> ImageSource:
    split: DataSplitConfig = cfg.split(partition)
    key = f"DATA.{partition}"
    if not split.enabled:
        raise DatasetError(f"{key}.DATA_SOURCES is empty: no {partition} data configured")
    source: ImageSource
    if split.source == "digits":
        source = DigitsSource(partition, split.IMAGE_SIZE)
    elif split.source == "synthetic":
        source = SyntheticSource(split.SYNTHETIC_SIZE, split.IMAGE_SIZE, cfg.EXPERIMENT.SEED, partition)
    else:
        if len(split.DATA_PATHS) != 1:
            raise DatasetError(f"{key}.DATA_PATHS: {split.source} needs exactly one path, got {split.DATA_PATHS}")
        path = split.DATA_PATHS[0]
        if split.source == "mnist_idx":
            source = IdxSource(open_store(path, cfg.STORAGE), partition, split.IMAGE_SIZE, f"{key}.DATA_PATHS")
        elif split.source == "disk_folder":
            # TEST's class ids are TRAIN's: a class TEST lacks must not shift the ids of the classes after it.
            classes = train_class_list(cfg) if partition != "TRAIN" else None
            source = folder_source(path, cfg, f"{key}.DATA_PATHS", classes)
        else:
            source = filelist_source(path, cfg, f"{key}.DATA_PATHS")
    if split.DATA_LIMIT >= 0:
        source = Subset(source, limit_indices(split, len(source), source.targets, key))
    return source


class Subset:
    """The images of `inner` at `indices` (int64, ascending): what DATA_LIMIT keeps, in dataset order."""

    def __init__(self, inner: ImageSource, indices: np.ndarray) -> None:
        self.inner = inner
        self.indices = indices
        self.targets = inner.targets[indices] if inner.targets is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> Image.Image:
        return self.inner.load(int(self.indices[index]))

    def name(self, index: int) -> str:
        return self.inner.name(int(self.indices[index]))

    def key(self, index: int) -> str:
        return self.inner.key(int(self.indices[index]))


def limit_indices(split: DataSplitConfig, size: int, targets: np.ndarray | None, key: str) -> np.ndarray:
    """The dataset indices (int64, ascending) DATA_LIMIT keeps out of `size`, as DATA_LIMIT_SAMPLING says."""
    sampling = split.DATA_LIMIT_SAMPLING
    method = sampling.METHOD
    if method == "auto":
        method = "random" if split.source in RANDOM_LIMIT_SOURCES else "first"
    skip, limit = sampling.SKIP_NUM_SAMPLES, split.DATA_LIMIT
    if method == "first":
        return np.arange(min(skip, size), min(skip + limit, size), dtype=np.int64)
    if sampling.IS_BALANCED:
        if targets is None:
            raise DatasetError(
                f"{key}.DATA_LIMIT_SAMPLING.IS_BALANCED: balanced sampling needs ground-truth labels, and "
                f"{key} ({split.source}) has none; set it to false"
            )
        return balanced_sample(targets, limit, skip, sampling.SEED, key)
    return random_sample(size, limit, skip, sampling.SEED)


def random_sample(size: int, limit: int, skip: int, seed: int) -> np.ndarray:
    """VISSL's unbalanced_sub_sampling, sorted: numpy's legacy seeded draw of skip + limit of `size` indices
    without replacement, the first `skip` dropped. (That draw is a prefix of one permutation, so capping
    it at `size` keeps the same images.)"""
    drawn = np.random.RandomState(seed).choice(size, min(skip + limit, size), replace=False)
    return np.sort(drawn[skip:]).astype(np.int64)


def balanced_sample(targets: np.ndarray, limit: int, skip: int, seed: int, key: str) -> np.ndarray:
    """VISSL's balanced_sub_sampling, sorted: per class in id order, one seeded stream, `limit // classes`
    images (one more for the first `limit % classes` classes), after skipping likewise."""
    classes = np.unique(targets)
    take, take_rest = divmod(limit, len(classes))
    drop, drop_rest = divmod(skip, len(classes))
    if take == 0:
        raise DatasetError(
            f"{key}.DATA_LIMIT={limit}: balanced sampling needs at least one image per class ({len(classes)} classes)"
        )
    rng = np.random.RandomState(seed)
    kept = []
    for i, label in enumerate(classes):
        members = np.flatnonzero(targets == label)
        wanted = take + (i < take_rest) + drop + (i < drop_rest)
        if wanted > len(members):
            raise DatasetError(
                f"{key}.DATA_LIMIT={limit}: class {int(label)} has {len(members)} images, fewer than the {wanted} "
                "a balanced draw needs (with SKIP_NUM_SAMPLES); lower DATA_LIMIT or set IS_BALANCED: false"
            )
        kept.append(rng.choice(members, wanted, replace=False)[drop + (i < drop_rest) :])
    return np.sort(np.concatenate(kept)).astype(np.int64)


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, str]]):
    """(image tensor, dataset index, problem): problem is "" for an image that was read, else (with
    on_bad_image "skip") its reason, with a blank image."""

    def __init__(
        self, source: ImageSource, transform: Callable[[Image.Image], torch.Tensor], on_bad_image: str = "error"
    ) -> None:
        self.source = source
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.source.load(index)
        except BadImageError as exc:
            if self.on_bad_image != "skip":
                raise
            log.warning("skipped (DATA.ON_BAD_IMAGE=skip): %s", exc)
            return self.blank(), index, exc.reason
        return self.transform(image), index, ""

    def blank(self) -> torch.Tensor:
        if self._blank is None:
            self._blank = torch.zeros_like(self.transform(Image.new("RGB", (8, 8))))
        return self._blank


def eval_transform(cfg: TransformsConfig) -> Callable[[Image.Image], Any]:
    """VISSL's evaluation transform: Resize, CenterCrop, ToTensor, Normalize."""
    return T.Compose(
        [T.Resize(cfg.EVAL_RESIZE), T.CenterCrop(cfg.EVAL_CROP_SIZE), T.ToTensor(), T.Normalize(cfg.MEAN, cfg.STD)]
    )


def train_transform(cfg: TransformsConfig) -> Callable[[Image.Image], Any]:
    """VISSL's ClusterFit training transform: RandomResizedCrop, ColorJitter, flip, Normalize."""
    steps: list[Any] = [T.RandomResizedCrop(cfg.TRAIN_CROP_SIZE, scale=(cfg.TRAIN_MIN_SCALE, 1.0))]
    if any(cfg.COLOR_JITTER):
        steps.append(T.ColorJitter(*cfg.COLOR_JITTER))
    if cfg.HORIZONTAL_FLIP:
        steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(cfg.MEAN, cfg.STD)]
    return T.Compose(steps)


def build_dataset(cfg: Config, partition: str, transform: Callable[[Image.Image], Any]) -> ImageDataset:
    return ImageDataset(build_source(cfg, partition), transform, cfg.DATA.ON_BAD_IMAGE)


def dataset_identity(cfg: Config, partition: str) -> dict[str, Any]:
    """What identifies a split's images (for fingerprints): its config and its size."""
    split = cfg.split(partition)
    return {
        "partition": partition,
        "split": split.model_dump(mode="json", exclude={"LABEL_PATHS", "TRUST_LABEL_ORDER", "BATCHSIZE_PER_REPLICA"}),
    }


def images_identity(source: ImageSource) -> dict[str, Any]:
    """Which images, in which order: their count and the sha256 of their root-relative names, one per line,
    in dataset order. The one definition: extract records it, cluster keeps it beside each label file,
    and training refuses labels recorded for another identity."""
    digest = hashlib.sha256()
    for index in range(len(source)):
        digest.update(source.key(index).encode(errors="surrogateescape") + b"\n")  # a local name's own bytes
    return {"num_images": len(source), "images_sha256": digest.hexdigest()}


def subset_indices(source: ImageSource) -> np.ndarray | None:
    """The indices (int64) DATA_LIMIT kept in the full dataset; None when the split is whole."""
    return source.indices if isinstance(source, Subset) else None
