"""Datasets with a stable index order that artifacts refer to.

Sources (`DATA.<SPLIT>.DATA_SOURCES`):
- `disk_folder`: an ImageFolder tree `<root>/<class>/<image>`, local or an `s3://` prefix; classes
  and files sorted, as torchvision's ImageFolder orders them.
- `disk_filelist`: a text file, one `path[,label]` per line (paths relative to the list's folder).
- `digits`: scikit-learn's bundled 8x8 handwritten digits (real images, no download), upsampled to
  RGB; TRAIN is every index with i % 5 != 0, TEST the rest.
- `synthetic`: deterministic random images with 10 classes, for tests.

Every item is `(image_tensor, dataset_index, ok)`; `ok` is False only for an unreadable image
when `DATA.ON_BAD_IMAGE: skip`, otherwise such an image raises `BadImageError` naming the file.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from clusterfit.config import Config, DataSplitConfig, TransformsConfig
from clusterfit.errors import UserError
from clusterfit.storage import Store, open_store, read_uri, split_uri

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetError(UserError, ValueError):
    """A dataset that cannot be read; the message names the config key, folder or file."""


class BadImageError(DatasetError):
    """One image that cannot be decoded."""


class ImageSource(Protocol):
    @property
    def targets(self) -> np.ndarray | None:
        """Ground-truth class per index (int64), when known."""

    def __len__(self) -> int: ...
    def load(self, index: int) -> Image.Image: ...
    def name(self, index: int) -> str: ...


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


class FileSource:
    """Images named by keys below one store root (a folder tree or a file list)."""

    def __init__(self, store: Store, keys: list[str], targets: np.ndarray | None, classes: list[str]) -> None:
        self.store = store
        self.keys = keys
        self.targets = targets
        self.classes = classes

    def __len__(self) -> int:
        return len(self.keys)

    def name(self, index: int) -> str:
        return self.store.uri(self.keys[index])

    def load(self, index: int) -> Image.Image:
        try:
            data = self.store.get_bytes(self.keys[index])
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        except Exception as exc:
            raise BadImageError(f"{self.name(index)}: cannot read image: {exc}") from exc


def folder_source(path: str, cfg: Config, key: str) -> FileSource:
    store = open_store(path, cfg.STORAGE)
    if store.root.startswith("file:") and not Path(store.backend.root).is_dir():  # type: ignore[attr-defined]
        raise DatasetError(f"{key}: {path}: no such folder")
    keys = [k for k in store.list("") if k.lower().endswith(IMAGE_SUFFIXES) and "/" in k]
    if not keys:
        raise DatasetError(
            f"{key}: {path}: no images found in <root>/<class>/<image> layout ({', '.join(IMAGE_SUFFIXES)})"
        )
    classes = sorted({k.split("/", 1)[0] for k in keys})
    class_index = {c: i for i, c in enumerate(classes)}
    # torchvision's order: by class, then by folder (a folder's own files before its subfolders'), then name.
    keys.sort(key=lambda k: (class_index[k.split("/", 1)[0]], k.rpartition("/")[0], k.rpartition("/")[2]))
    targets = np.array([class_index[k.split("/", 1)[0]] for k in keys], dtype=np.int64)
    return FileSource(store, keys, targets, classes)


def filelist_source(path: str, cfg: Config, key: str) -> FileSource:
    try:
        text = read_uri(path, cfg.STORAGE).decode()
    except Exception as exc:
        raise DatasetError(f"{key}: {path}: cannot read file list: {exc}") from exc
    head, _ = split_uri(path if "://" in path else Path(path).absolute().as_uri())
    keys: list[str] = []
    labels: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        name, _, label = line.strip().partition(",")
        keys.append(name.strip())
        if label.strip():
            try:
                labels.append(int(label))
            except ValueError:
                raise DatasetError(f"{path}:{number}: label {label!r} is not an integer") from None
    if labels and len(labels) != len(keys):
        raise DatasetError(f"{path}: {len(labels)} of {len(keys)} lines have a label; label all or none")
    targets = np.array(labels, dtype=np.int64) if labels else None
    return FileSource(open_store(head, cfg.STORAGE), keys, targets, [])


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
        builder = folder_source if split.source == "disk_folder" else filelist_source
        source = builder(split.DATA_PATHS[0], cfg, f"{key}.DATA_PATHS")
    if split.DATA_LIMIT >= 0:
        source = Limited(source, split.DATA_LIMIT)
    return source


class Limited:
    def __init__(self, inner: ImageSource, limit: int) -> None:
        self.inner = inner
        self.size = min(limit, len(inner))
        self.targets = inner.targets[: self.size] if inner.targets is not None else None

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> Image.Image:
        return self.inner.load(index)

    def name(self, index: int) -> str:
        return self.inner.name(index)


class ImageDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, bool]]):
    def __init__(
        self, source: ImageSource, transform: Callable[[Image.Image], torch.Tensor], on_bad_image: str = "error"
    ) -> None:
        self.source = source
        self.transform = transform
        self.on_bad_image = on_bad_image
        self._blank: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            image = self.source.load(index)
        except BadImageError:
            if self.on_bad_image != "skip":
                raise
            log.warning("skipping unreadable image %s", self.source.name(index))
            return self.blank(), index, False
        return self.transform(image), index, True

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
        "split": split.model_dump(mode="json", exclude={"LABEL_PATHS", "BATCHSIZE_PER_REPLICA"}),
    }
