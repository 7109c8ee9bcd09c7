"""Pseudo-labels for training: the experiment's cluster labels or DATA.TRAIN.LABEL_PATHS, checked
before the first step (which images, in which order; length, dtype, range), with messages naming
the file and the numbers.

A label file is only as good as its order. Three kinds are accepted:
- VISSL's `<name>_labels.npy` with `<name>_images.npy` beside it (tools/cluster_features_and_label.py
  writes both, in extraction-shard order): realigned to this dataset by image path; a dataset image
  VISSL did not label gets -1 (not trained on), a listed image the dataset lacks is an error.
- Ours, `clusters/<name>/labels.npy` (or `<split>/labels.npy`) with the folder's `_SUCCESS.json`,
  which records the identity (`clusterfit.data.images_identity`) of the images labelled: it must be
  the training dataset's.
- A bare file, only with DATA.TRAIN.TRUST_LABEL_ORDER (taken in dataset order, with a warning).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from clusterfit import artifacts
from clusterfit.artifacts.layout import LABELS, LABELS_IMAGES_KEY, MANIFEST, cluster_folder, vissl_image_list
from clusterfit.config import Config
from clusterfit.data import ImageSource, build_source, images_identity
from clusterfit.errors import UserError
from clusterfit.storage import NotFound, Store, read_uri, sha256_bytes, split_uri

log = logging.getLogger(__name__)
KEY = "DATA.TRAIN.LABEL_PATHS"


class LabelError(UserError, ValueError):
    """A label file that does not fit the dataset or NUM_CLUSTERS."""


def load_labels(
    cfg: Config, store: Store, num_images: int, source: ImageSource | None = None
) -> tuple[np.ndarray, str, str]:
    """(labels int64 (num_images,) in dataset order, source URI, digest); -1 marks images without a label.

    `source`: the training images (DATA.TRAIN), built here when not given."""
    images = source if source is not None else build_source(cfg, "TRAIN")
    if len(images) != num_images:
        raise ValueError(f"num_images={num_images} but the source has {len(images)} images")
    if cfg.DATA.TRAIN.LABEL_PATHS:
        labels, uri, digest = label_file(cfg, cfg.DATA.TRAIN.LABEL_PATHS[0], images)
    else:
        folder = cluster_folder(cfg)
        manifest = artifacts.read_manifest(store, folder)
        labels = artifacts.load_array(store, folder, LABELS, manifest)
        uri, digest = store.uri(f"{folder}/{LABELS}"), str(manifest["_digest"])
        check_identity(manifest.get(LABELS_IMAGES_KEY, {}).get(LABELS), uri, images, required=False)
    check_labels(labels, uri, num_images, cfg.CLUSTERFIT.NUM_CLUSTERS)
    return labels.astype(np.int64), uri, digest


def label_file(cfg: Config, uri: str, images: ImageSource) -> tuple[np.ndarray, str, str]:
    """A LABEL_PATHS file in dataset order, by whichever of the three kinds it is; (labels, URI, digest)."""
    data = read_uri(uri, cfg.STORAGE)
    labels = read_npy(data, uri)
    digest = sha256_bytes(data)
    num_clusters = cfg.CLUSTERFIT.NUM_CLUSTERS
    images_uri = vissl_image_list(uri)
    listed = optional_read(images_uri, cfg)
    if listed is not None:
        paths = read_npy(listed, images_uri)
        if not np.issubdtype(labels.dtype, np.integer):
            raise LabelError(f"{uri}: labels must be integers (int64), got dtype {labels.dtype}")
        aligned = realign(labels, paths, images, uri, images_uri, cfg.DATA.TRAIN.DATA_PATHS)
        return aligned, uri, sha256_bytes((digest + sha256_bytes(listed)).encode())
    ours = our_manifest(cfg, uri)
    check_labels(labels, uri, len(images), num_clusters)
    if ours is not None:
        manifest, name = ours
        entry = manifest.get("files", {}).get(name, {})
        if entry.get("sha256") != digest:
            raise LabelError(f"{KEY}: {uri}: does not match its folder's {MANIFEST} (altered after publication?)")
        check_identity(manifest.get(LABELS_IMAGES_KEY, {}).get(name), uri, images, required=True)
    elif cfg.DATA.TRAIN.TRUST_LABEL_ORDER:
        log.warning(
            "%s: %s has no image list and no %s beside it; taken as one label per image in dataset order, "
            "unchecked (DATA.TRAIN.TRUST_LABEL_ORDER=true)",
            KEY,
            uri,
            MANIFEST,
        )
    else:
        raise LabelError(
            f"{KEY}: {uri}: cannot check that these labels follow this dataset's image order. Provide VISSL's image "
            f"list beside it ({images_uri}, written with the labels by VISSL's tools/cluster_features_and_label.py), "
            f"or point at a clusterfit clusters/<name>/{LABELS} with its {MANIFEST}, or set "
            "DATA.TRAIN.TRUST_LABEL_ORDER=true to take it as one label per image in dataset order, unchecked"
        )
    return labels, uri, digest


def read_npy(data: bytes, uri: str) -> np.ndarray:
    try:
        array: np.ndarray = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise LabelError(f"{KEY}: {uri}: not a .npy array: {exc}") from exc
    return array


def optional_read(uri: str, cfg: Config) -> bytes | None:
    try:
        return read_uri(uri, cfg.STORAGE)
    except NotFound:
        return None


def our_manifest(cfg: Config, uri: str) -> tuple[dict[str, Any], str] | None:
    """(the manifest of the published folder holding `uri`, the file's name in it): a `_SUCCESS.json` beside
    the file, or one level up for a per-split file; None when there is neither."""
    folder, name = split_uri(uri if "://" in uri else Path(uri).absolute().as_uri())
    candidates = [(folder, name)]
    parent, sub = split_uri(folder)
    if urlparse(parent).path.strip("/"):  # never above a bucket or the filesystem root
        candidates.append((parent, f"{sub}/{name}"))
    for where, relative in candidates:
        data = optional_read(f"{where}/{MANIFEST}", cfg)
        if data is not None:
            try:
                manifest: dict[str, Any] = json.loads(data)
            except json.JSONDecodeError as exc:
                raise LabelError(f"{KEY}: {where}/{MANIFEST}: not valid JSON: {exc}") from exc
            return manifest, relative
    return None


def check_identity(recorded: dict[str, Any] | None, uri: str, images: ImageSource, required: bool) -> None:
    """Refuse labels recorded for other images, or another order, than the training dataset's."""
    if recorded is None:
        if required:
            raise LabelError(
                f"{KEY}: {uri}: its {MANIFEST} does not record which images it labels (written by an older "
                "clusterfit); rerun extract and cluster, or point at VISSL's label + image-list pair"
            )
        log.warning("%s: no record of which images these labels are for (older clusterfit); unchecked", uri)
        return
    actual = images_identity(images)
    if recorded != actual:
        raise LabelError(
            f"{uri}: labels of {recorded.get('num_images')} images (names sha256 "
            f"{str(recorded.get('images_sha256'))[:12]}), but DATA.TRAIN is {actual['num_images']} images (sha256 "
            f"{actual['images_sha256'][:12]}): other images or another order (DATA.TRAIN.DATA_PATHS, DATA_LIMIT, "
            "DATA_LIMIT_SAMPLING); train on the data these labels were made from, or recluster"
        )


def realign(
    labels: np.ndarray, paths: np.ndarray, images: ImageSource, uri: str, images_uri: str, data_paths: list[str]
) -> np.ndarray:
    """VISSL's labels (in its list's order) -> one per dataset image, in dataset order, -1 where unlisted.

    VISSL's list holds the paths it read (`<its root>/<class>/<file>`); the root is found from the first
    path, as what is left once its tail matches a dataset image's root-relative name."""
    if paths.ndim != 1 or labels.ndim != 1 or len(paths) != len(labels):
        raise LabelError(
            f"{KEY}: {uri}: {len(labels)} labels but {images_uri} lists {len(paths)} images (shapes {labels.shape}, "
            f"{paths.shape}): not a pair written together"
        )
    where = {images.key(i): i for i in range(len(images))}
    names = [str(p).replace("\\", "/") for p in paths.tolist()]
    root = vissl_root(names[0], where) if names else ""
    index = np.empty(len(names), dtype=np.int64)
    for n, name in enumerate(names):
        found = where.get(name[len(root) :], -1) if name.startswith(root) else -1
        if found < 0:
            raise LabelError(
                f"{KEY}: {images_uri}: image {name} is not in the training dataset (DATA.TRAIN.DATA_PATHS="
                f"{data_paths}); these labels were made for other data"
            )
        index[n] = found
    if len(np.unique(index)) != len(index):
        raise LabelError(f"{KEY}: {images_uri}: lists some images more than once")
    aligned = np.full(len(images), -1, dtype=np.int64)
    aligned[index] = labels
    if len(index) < len(images):
        log.warning("%s: %d of %d training images have no label in %s", KEY, len(images) - len(index), len(images), uri)
    return aligned


def vissl_root(path: str, where: dict[str, int]) -> str:
    """The prefix of `path` before the longest tail that names a dataset image; the path itself when none does
    (then nothing matches, and the caller names the path)."""
    parts = path.split("/")
    for start in range(len(parts)):
        if "/".join(parts[start:]) in where:
            return "/".join(parts[:start]) + ("/" if start else "")
    return path


def check_labels(labels: np.ndarray, uri: str, num_images: int, num_clusters: int) -> None:
    if labels.ndim != 1:
        raise LabelError(f"{uri}: labels must be one-dimensional (one per image), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise LabelError(f"{uri}: labels must be integers (int64), got dtype {labels.dtype}")
    if len(labels) != num_images:
        raise LabelError(f"{uri}: {len(labels)} labels but the training dataset has {num_images} images")
    valid = labels[labels != -1]
    if len(valid) == 0:
        raise LabelError(f"{uri}: no image has a label")
    low, high = int(valid.min()), int(valid.max())
    if low < 0 or high >= num_clusters:
        raise LabelError(
            f"{uri}: label ids range {low}..{high}, outside 0..{num_clusters - 1} "
            f"(CLUSTERFIT.NUM_CLUSTERS={num_clusters})"
        )
