"""Helpers for the step tests: read artifacts straight from disk (independent of our readers)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def features_from_disk(root: Path, split: str, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices, features) of a features folder, concatenated in index order, read with plain numpy."""
    folder = root / "features" / split / layer
    idx, feats = [], []
    for part in sorted(folder.glob("part-*-index.npy")):
        idx.append(np.load(part))
        feats.append(np.load(str(part).replace("-index.npy", ".npy")))
    index, features = np.concatenate(idx), np.concatenate(feats)
    order = np.argsort(index)
    return index[order], features[order]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "_SUCCESS.json").read_text())
