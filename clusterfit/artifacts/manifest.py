"""The artifact contract between steps: files plus a `_SUCCESS.json` manifest written last.

A step collects what it writes in a `Ledger` (each file's size, sha256, and for arrays shape and
dtype), then `publish()` writes `<folder>/_SUCCESS.json` with the resolved config, the inputs'
digests, a fingerprint, versions and timings. Readers call `read_manifest()` (which refuses a
folder without one) and `load_array()`/`load_bytes()`, which verify what they read against it.
A step whose manifest carries the same fingerprint (same config and inputs) is skipped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clusterfit import __version__
from clusterfit.artifacts.layout import MANIFEST
from clusterfit.errors import UserError
from clusterfit.storage import NotFound, Store, array_from_bytes, array_to_bytes, sha256_bytes

log = logging.getLogger(__name__)
FORMAT_VERSION = 1


class ArtifactError(UserError, RuntimeError):
    """A missing, unfinished or altered artifact; the message names the folder or file."""


def npy_meta(data: bytes) -> dict[str, Any]:
    """Shape and dtype from a .npy header, without loading the array."""
    buffer = io.BytesIO(data[:4096])
    version = np.lib.format.read_magic(buffer)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(buffer)
    return {"shape": list(shape), "dtype": np.dtype(dtype).str}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()


def fingerprint(step: str, config_tree: dict[str, Any], inputs: dict[str, str]) -> str:
    """What decides a step's output: its name, the config keys it reads, its inputs' digests."""
    return hashlib.sha256(canonical_json({"step": step, "config": config_tree, "inputs": inputs})).hexdigest()


def versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "clusterfit": __version__, "numpy": np.__version__}
    for name in ("torch", "torchvision", "faiss"):  # only those already imported: never import torch here
        module = sys.modules.get(name)
        if module is not None:
            found[name] = str(getattr(module, "__version__", "?"))
    return found


@dataclass
class Ledger:
    """Writes files under one folder and remembers what it wrote, for the manifest."""

    store: Store
    folder: str
    files: dict[str, dict[str, Any]] = field(default_factory=dict)

    def key(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def put_bytes(self, name: str, data: bytes, meta: dict[str, Any] | None = None) -> None:
        self.store.put_bytes(self.key(name), data)
        self.record(name, data, meta)

    def put_array(self, name: str, array: np.ndarray) -> None:
        data = array_to_bytes(array)
        self.put_bytes(name, data, {"shape": list(array.shape), "dtype": array.dtype.str})

    def put_json(self, name: str, obj: Any) -> None:
        self.put_bytes(name, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def record(self, name: str, data: bytes, meta: dict[str, Any] | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"size": len(data), "sha256": sha256_bytes(data)}
        if meta is None and name.endswith(".npy"):
            meta = npy_meta(data)
        entry.update(meta or {})
        self.files[name] = entry
        return entry


def publish(
    ledger: Ledger,
    *,
    step: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    fingerprint_: str,
    started_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `<folder>/_SUCCESS.json`, last: from here on readers accept the folder. Refused when a file
    the ledger wrote is missing or has another size now (a lost or cut-off upload, a deleted part)."""
    check_written(ledger)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "fingerprint": fingerprint_,
        "inputs": inputs,
        "files": ledger.files,
        "config": config,
        "versions": versions(),
        "timings": {"started_unix_s": started_s, "finished_unix_s": time.time(), "wall_s": time.time() - started_s},
        **(extra or {}),
    }
    # A run that lost the experiment's lease (clusterfit/lease.py) must not publish: ask the lease itself first.
    ledger.store.writable(ledger.key(MANIFEST), confirm=True)
    ledger.store.put_bytes(ledger.key(MANIFEST), json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    return manifest


def check_written(ledger: Ledger) -> None:
    """Every file of the ledger is in storage with the size it was written with (one listing)."""
    found = ledger.store.sizes(f"{ledger.folder}/")
    for name, entry in sorted(ledger.files.items()):
        size = found.get(ledger.key(name))
        if size != entry["size"]:
            state = "is missing" if size is None else f"has {size:,} bytes, not the {entry['size']:,} written"
            raise ArtifactError(
                f"{ledger.store.uri(ledger.key(name))} {state}: {MANIFEST} not written, so the folder stays "
                "unpublished; rerun the step"
            )


def read_manifest(store: Store, folder: str) -> dict[str, Any]:
    """The folder's manifest; a folder without one is refused."""
    try:
        data = store.get_bytes(f"{folder}/{MANIFEST}")
    except NotFound:
        raise ArtifactError(
            f"{store.uri(folder)}: no {MANIFEST}: the step that writes this artifact has not finished (or never ran)"
        ) from None
    where = f"{store.uri(folder)}/{MANIFEST}"
    try:
        manifest: dict[str, Any] = json.loads(data)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise ArtifactError(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise ArtifactError(f"{where}: not a manifest (a JSON object whose 'files' is an object)")
    for name, entry in manifest.get("files", {}).items():
        if not (isinstance(entry, dict) and type(entry.get("size")) is int and isinstance(entry.get("sha256"), str)):
            raise ArtifactError(f"{where}: the entry of {name!r} lacks an integer 'size' and a text 'sha256'")
    manifest["_digest"] = sha256_bytes(data)
    return manifest


def is_published(store: Store, folder: str, fingerprint_: str) -> bool:
    try:
        return bool(read_manifest(store, folder).get("fingerprint") == fingerprint_)
    except ArtifactError:
        return False


def skip_if_published(store: Store, folder: str, fingerprint_: str, step: str) -> bool:
    """Whether `folder` is already published with this fingerprint, so `step` has nothing to do (and says so)."""
    if not is_published(store, folder, fingerprint_):
        return False
    log.info("%s: already published at %s with the same config and inputs; skipping", step, store.uri(folder))
    return True


def load_bytes(store: Store, folder: str, name: str, manifest: dict[str, Any]) -> bytes:
    """A file of a published folder, checked against the manifest's size and sha256."""
    entry = manifest.get("files", {}).get(name)
    if entry is None:
        raise ArtifactError(f"{store.uri(folder)}: {name} is not listed in its {MANIFEST}")
    data = store.get_bytes(f"{folder}/{name}")
    if len(data) != entry["size"] or sha256_bytes(data) != entry["sha256"]:
        raise ArtifactError(
            f"{store.uri(folder + '/' + name)}: does not match {MANIFEST} "
            f"(size {len(data)} vs {entry['size']}, sha256 {sha256_bytes(data)[:12]} vs {entry['sha256'][:12]}): "
            "the file was altered after publication; rerun the step that wrote it"
        )
    return data


def load_array(store: Store, folder: str, name: str, manifest: dict[str, Any], copy: bool = True) -> np.ndarray:
    """The verified array; `copy=False`: a read-only view of the bytes read (storage.array_from_bytes)."""
    return array_from_bytes(load_bytes(store, folder, name, manifest), store.uri(f"{folder}/{name}"), copy)


def load_json(store: Store, folder: str, name: str, manifest: dict[str, Any]) -> Any:
    return json.loads(load_bytes(store, folder, name, manifest))
