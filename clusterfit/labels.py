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
from clusterfit.storage import NotFound, Store, npy_view, read_uri, sha256_bytes, split_uri

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
        check_identity(recorded_identity(manifest, LABELS), uri, images, required=False)
    check_labels(labels, uri, num_images, cfg.CLUSTERFIT.NUM_CLUSTERS)
    return labels.astype(np.int64), uri, digest


def label_file(cfg: Config, uri: str, images: ImageSource) -> tuple[np.ndarray, str, str]:
    """A LABEL_PATHS file in dataset order, by whichever of the three kinds it is; (labels, URI, digest)."""
    data = optional_read(uri, cfg)
    if data is None:
        raise LabelError(f"{KEY}: {uri}: no such file")
    labels = read_npy(data, uri)
    digest = sha256_bytes(data)
    num_clusters = cfg.CLUSTERFIT.NUM_CLUSTERS
    images_uri = vissl_image_list(uri)
    listed = optional_read(images_uri, cfg)
    if listed is not None:
        paths = read_npy(listed, images_uri)
        if labels.dtype.kind not in "iu":  # numpy counts timedelta64 as an integer type
            raise LabelError(f"{uri}: labels must be integers (int64), got dtype {labels.dtype}")
        aligned = realign(labels, paths, images, uri, images_uri, cfg.DATA.TRAIN.DATA_PATHS)
        return aligned, uri, sha256_bytes((digest + sha256_bytes(listed)).encode())
    ours = our_manifest(cfg, uri)
    check_labels(labels, uri, len(images), num_clusters)
    if ours is not None:
        manifest, name = ours
        entry = manifest["files"].get(name)
        if not isinstance(entry, dict) or entry.get("sha256") != digest:
            raise LabelError(f"{KEY}: {uri}: does not match its folder's {MANIFEST} (altered after publication?)")
        check_identity(recorded_identity(manifest, name), uri, images, required=True)
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
    """The array in .npy bytes; its header is checked against the payload before anything is allocated (a
    header may claim terabytes), and a .npz (a zip, which np.load would open) is refused."""
    try:
        return np.array(npy_view(data))
    except (ValueError, OSError, EOFError, MemoryError) as exc:
        raise LabelError(f"{KEY}: {uri}: not a .npy array: {exc}") from None


def optional_read(uri: str, cfg: Config) -> bytes | None:
    """The bytes at `uri`; None when there is nothing there."""
    try:
        return read_uri(uri, cfg.STORAGE)
    except NotFound:
        return None
    except OSError as exc:  # a folder, or a file the system refuses to read
        raise LabelError(f"{KEY}: {uri}: cannot read: {exc.strerror or exc}") from None


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
                manifest = json.loads(data)
            except ValueError as exc:  # not JSON, or not UTF-8
                raise LabelError(f"{KEY}: {where}/{MANIFEST}: not valid JSON: {exc}") from None
            if not isinstance(manifest, dict) or not isinstance(manifest.setdefault("files", {}), dict):
                raise LabelError(f"{KEY}: {where}/{MANIFEST}: not a manifest (a JSON object whose 'files' is one)")
            return manifest, relative
    return None


def recorded_identity(manifest: dict[str, Any], name: str) -> Any:
    """The identity of the images the label file `name` labels, as its manifest records it (None: not recorded)."""
    per_file = manifest.get(LABELS_IMAGES_KEY)
    return per_file.get(name) if isinstance(per_file, dict) else None


def check_identity(recorded: Any, uri: str, images: ImageSource, required: bool) -> None:
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
        said = recorded if isinstance(recorded, dict) else {}
        raise LabelError(
            f"{uri}: labels of {said.get('num_images')} images (names sha256 "
            f"{str(said.get('images_sha256'))[:12]}), but DATA.TRAIN is {actual['num_images']} images (sha256 "
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
            f"{KEY}: {uri}: {labels.size} labels but {images_uri} lists {paths.size} images (shapes {labels.shape}, "
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
    if labels.dtype.kind not in "iu":  # numpy counts timedelta64 (NaT included) as an integer type
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
