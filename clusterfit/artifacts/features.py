"""Reading a published feature folder: its part files for one layer, verified, in part order."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clusterfit.artifacts import manifest as artifacts
from clusterfit.artifacts.layout import index_name, parse_part
from clusterfit.errors import UserError
from clusterfit.storage import Store

log = logging.getLogger(__name__)


class InputError(UserError, ValueError):
    """Input data that a step cannot use (NaN features, K larger than the data, mismatched files)."""


STORAGE_DTYPE_KEY = "storage_dtype"  # the feature manifest's key: how the parts store features
FLOAT16_MAX = float(np.finfo(np.float16).max)


def encode_features(feats: np.ndarray, storage_dtype: str) -> np.ndarray:
    """float32 (n, D) features -> the array a part file stores: float32, float16, or bfloat16 as the
    upper 16 bits of each float32 (uint16 (n, D), rounded to nearest even). Finite input only."""
    feats = np.ascontiguousarray(feats, dtype=np.float32)
    if storage_dtype == "float32":
        return feats
    if storage_dtype == "float16":
        return feats.astype(np.float16)
    if storage_dtype == "bfloat16":
        bits = feats.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    raise ValueError(f"EXTRACT.STORAGE_DTYPE={storage_dtype!r}: expected float32, float16 or bfloat16")


def decode_features(stored: np.ndarray, storage_dtype: str) -> np.ndarray:
    """A part file's array -> float32 (n, D): the inverse of encode_features (exact for the stored values)."""
    if storage_dtype == "bfloat16":
        if stored.dtype != np.uint16:
            raise InputError(f"bfloat16 features are stored as uint16, got {stored.dtype}")
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32, copy=False)


@dataclass
class FeatureParts:
    store: Store
    folder: str
    layer: str
    manifest: dict[str, Any]
    names: list[str]
    rows: list[int]
    cache_limit_bytes: int = 4096 * 1024 * 1024
    _cache: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    @classmethod
    def open(cls, store: Store, folder: str, layer: str, cache_mb: int = 4096) -> FeatureParts:
        manifest = artifacts.read_manifest(store, folder)
        parts = {name: parsed for name in manifest["files"] if (parsed := parse_part(name))}
        found = sorted((chunk, name) for name, (part_layer, chunk) in parts.items() if part_layer == layer)
        if not found:
            layers = sorted({part_layer for part_layer, _ in parts.values()})
            raise InputError(f"{store.uri(folder)}: no features of layer {layer!r} (it has {layers})")
        names = [name for _, name in found]
        rows = [int(manifest["files"][name]["shape"][0]) for name in names]
        return cls(store, folder, layer, manifest, names, rows, cache_mb * 1024 * 1024)

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @property
    def num_images(self) -> int:
        return int(self.manifest.get("num_images", self.num_rows))

    @property
    def digest(self) -> str:
        return str(self.manifest["_digest"])

    @property
    def storage_dtype(self) -> str:
        """float32, float16 or bfloat16 (features published before the key existed are float32)."""
        return str(self.manifest.get(STORAGE_DTYPE_KEY, "float32"))

    @property
    def dim(self) -> int:
        return int(self.manifest["files"][self.names[0]]["shape"][1])

    def load_index(self, name: str) -> np.ndarray:
        """The dataset indices (int64 (n,)) of one part, checked against the manifest."""
        if name in self._cache:
            return self._cache[name][0]
        return artifacts.load_array(self.store, self.folder, index_name(name), self.manifest)

    def load(self, name: str, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """(indices int64 (n,), features float32 (n, D)) of one part, checked against the manifest and
        decoded from its storage dtype; not to be written to (float32 parts are read-only views of the bytes read).

        Kept in memory for the next call when `cache` and all the parts fit in the cache limit."""
        if name in self._cache:
            return self._cache[name]
        stored = artifacts.load_array(self.store, self.folder, name, self.manifest, copy=False)  # read-only
        index = self.load_index(name)
        uri = self.store.uri(f"{self.folder}/{name}")
        if stored.ndim != 2 or len(index) != len(stored):
            raise InputError(f"{uri}: expected an (n, D) array with n indices, got {stored.shape} and {index.shape}")
        try:
            feats = decode_features(stored, self.storage_dtype)
        except InputError as exc:
            raise InputError(f"{uri}: {exc}") from None
        if not np.isfinite(feats).all():
            bad = int((~np.isfinite(feats)).any(axis=1).sum())
            raise InputError(f"{uri}: {bad} feature rows contain NaN or inf")
        if cache and self.num_rows * self.dim * 4 <= self.cache_limit_bytes:  # cached as float32
            self._cache[name] = (index, feats)
        return index, feats

    def iter_parts(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for name in self.names:
            yield self.load(name)

    def gather(self, rows: np.ndarray | None) -> np.ndarray:
        """Features at global row positions (sorted; in part order), or all of them when rows is None.

        A new float32 (len(rows) or num_rows, D) array that the caller owns; with rows None the parts
        are not cached as well (the caller holds them all), so memory holds the features once."""
        out = np.empty((self.num_rows if rows is None else len(rows), self.dim), dtype=np.float32)
        start = filled = 0
        for name, count in zip(self.names, self.rows, strict=True):
            if rows is None:
                out[start : start + count] = self.load(name, cache=False)[1]
                filled = start + count
            else:
                lo, hi = np.searchsorted(rows, [start, start + count])
                if hi > lo:
                    out[filled : filled + hi - lo] = self.load(name)[1][rows[lo:hi] - start]
                    filled += hi - lo
            start += count
        return out
