"""MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST) as a data source, local or `s3://`.

The folder holds the four files under their usual names, gzipped or not:

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]     TRAIN
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]      TEST

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
big-endian uint32 per dimension, then the values in C order. These datasets store unsigned bytes
(type 0x08): images are (N, rows, cols), labels (N,). The reader below is exact for that type and
refuses any other with the file's name; it never downloads.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np
from PIL import Image

from clusterfit.errors import UserError
from clusterfit.storage import NotFound, Store

UBYTE = 0x08
FILES = {"TRAIN": "train", "TEST": "t10k"}
WHERE_TO_GET = (
    "Fashion-MNIST: Debian's dataset-fashion-mnist package installs these files in "
    "/usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`); MNIST and KMNIST: "
    "torchvision.datasets.MNIST/KMNIST(root, download=True) on a machine with internet writes them to "
    "<root>/<Name>/raw/"
)


class IdxError(UserError, ValueError):
    """An IDX file that is missing, truncated or not of the unsigned-byte type."""


def parse_idx(data: bytes, name: str) -> np.ndarray:
    """The array an IDX file of unsigned bytes holds (gzip is detected by its magic)."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxError(f"{name}: not a readable gzip file ({exc})") from exc
    if len(data) < 4 or data[:2] != b"\0\0":
        raise IdxError(f"{name}: not an IDX file (it starts with {data[:4]!r}, IDX starts with two zero bytes)")
    kind, ndim = data[2], data[3]
    if kind != UBYTE:
        raise IdxError(
            f"{name}: IDX value type 0x{kind:02x}; only unsigned bytes (0x08), as the MNIST family, are read"
        )
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise IdxError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise IdxError(f"{name}: {len(data)} bytes where an IDX file of shape {shape} has {expected} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(store: Store, stem: str, key: str) -> np.ndarray:
    """`<stem>` or `<stem>.gz` below the store's root."""
    for name in (f"{stem}.gz", stem):
        try:
            data = store.get_bytes(name)
        except NotFound:
            continue
        return parse_idx(data, store.uri(name))
    raise IdxError(f"{key}: {store.uri(stem)}[.gz] not found. {WHERE_TO_GET}")


class IdxSource:
    """One split of an MNIST-format dataset: gray images upsampled to RGB `image_size`, labels as targets."""

    def __init__(self, store: Store, partition: str, image_size: int, key: str) -> None:
        prefix = FILES["TEST" if partition == "TEST" else "TRAIN"]
        self.prefix = prefix
        self.image_size = image_size
        self.images = read_idx(store, f"{prefix}-images-idx3-ubyte", key)
        labels = read_idx(store, f"{prefix}-labels-idx1-ubyte", key)
        if self.images.ndim != 3 or labels.ndim != 1 or len(labels) != len(self.images):
            raise IdxError(
                f"{key}: {store.uri(prefix)}-*: images of shape {self.images.shape} and labels of shape "
                f"{labels.shape} do not pair up (expected (N, rows, cols) and (N,))"
            )
        self.targets = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        gray = Image.fromarray(self.images[index], mode="L")
        if gray.size != (self.image_size, self.image_size):
            gray = gray.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return gray.convert("RGB")

    def name(self, index: int) -> str:
        return f"{self.prefix}[{index}]"

    def key(self, index: int) -> str:
        return self.name(index)
