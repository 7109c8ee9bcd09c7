"""Training checkpoints: one dict with fixed keys, written atomically, resumed automatically.

The checkpoint object is written first, then the `latest.json` pointer is moved to it, so a reader
never sees a half-written checkpoint (on S3 too); the newest KEEP_CHECKPOINTS are kept. A
restarted step resumes from the pointer (Kubernetes restarts pods; a step must just continue).
`final.pt` is the published network and the config it was trained with.

The network is stored as VISSL stores it, so VISSL and MODEL.WEIGHTS_INIT load our files with their
defaults: `classy_state_dict.base_model.model.trunk` holds the trunk without its `trunk.` prefix
(`_feature_blocks.layer1.0.conv1.weight`), `….heads` head i's Linear as VISSL's one-layer `mlp`
head (`i.clf.0.weight`). Format 1 held the flat state dict under `classy_state_dict`; it still loads.
"""

from __future__ import annotations

import io
import json
import logging
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterfit.artifacts.layout import CHECKPOINTS, LATEST_POINTER, checkpoint_name
from clusterfit.config import Config
from clusterfit.storage import NotFound, Store, sha256_bytes

CHECKPOINT_FORMAT = 2
READABLE_FORMATS = (1, 2)  # 1: the flat state dict under classy_state_dict
KEEP_CHECKPOINTS = 2

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    step_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def make_checkpoint(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState, cfg: Config, fingerprint: str
) -> dict[str, Any]:
    """The resumable state; `fingerprint` ties it to the config and inputs that produced it."""
    return {
        "format_version": CHECKPOINT_FORMAT,
        "type": "consolidated",  # VISSL's CheckpointItemType: one file, not shards
        "classy_state_dict": vissl_classy_state(unwrap(model).state_dict()),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "step", "epoch": state.epoch, "step": state.step},
        "epoch": state.epoch,
        "step": state.step,
        "step_in_epoch": state.step_in_epoch,
        "history": state.history,
        "rng": rng_state(),
        "config": cfg.model_dump(mode="json"),
        "fingerprint": fingerprint,
    }


def save_checkpoint(store: Store, folder: str, ckpt: dict[str, Any]) -> str:
    """Write the checkpoint object, then move `latest.json` to it; keep the newest KEEP_CHECKPOINTS."""
    name = checkpoint_name(ckpt["epoch"], ckpt["step"])
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    data = buffer.getvalue()
    store.put_bytes(f"{folder}/{name}", data)
    pointer = {"checkpoint": name, "epoch": ckpt["epoch"], "step": ckpt["step"], "sha256": sha256_bytes(data)}
    store.put_bytes(f"{folder}/{LATEST_POINTER}", json.dumps(pointer).encode())
    for old in sorted(store.list(f"{folder}/{CHECKPOINTS}/"))[:-KEEP_CHECKPOINTS]:
        store.delete(old)
    return name


def load_latest(store: Store, folder: str) -> dict[str, Any] | None:
    """The newest readable checkpoint: the one `latest.json` points at, else (a checkpoint cut short
    or corrupted, as preemption can leave on a store without atomic writes) the newest older one
    that reads, with a warning naming what was skipped; None when there is none (start over)."""
    try:
        pointer: dict[str, Any] = json.loads(store.get_bytes(f"{folder}/{LATEST_POINTER}"))
    except NotFound:
        return None
    except ValueError as exc:
        log.warning(
            "%s: unreadable (%s); looking for the newest checkpoint that reads",
            store.uri(f"{folder}/{LATEST_POINTER}"),
            exc,
        )
        pointer = {}
    listed = sorted(store.list(f"{folder}/{CHECKPOINTS}/"), reverse=True)
    newest = f"{folder}/{pointer['checkpoint']}" if "checkpoint" in pointer else None
    candidates = [newest] if newest else []
    candidates += [key for key in listed if key != newest and (newest is None or key < newest)]
    skipped: list[str] = []
    for key in candidates:
        try:
            ckpt = read_checkpoint(store, key, pointer.get("sha256") if key == newest else None)
        except CorruptCheckpoint as exc:
            log.warning("%s", exc)
            skipped.append(store.uri(key))
            continue
        if skipped:
            log.warning(
                "resuming from the previous good checkpoint %s (skipped %s)", store.uri(key), ", ".join(skipped)
            )
        return ckpt
    if skipped:
        log.warning(
            "%s: no readable checkpoint (skipped %s); training starts over", store.uri(folder), ", ".join(skipped)
        )
    return None


class CorruptCheckpoint(RuntimeError):
    """A checkpoint object that is missing, cut short or does not match its recorded checksum."""


def read_checkpoint(store: Store, key: str, sha256: str | None) -> dict[str, Any]:
    uri = store.uri(key)
    try:
        data = store.get_bytes(key)
    except NotFound:
        raise CorruptCheckpoint(f"{uri}: missing") from None
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise CorruptCheckpoint(f"{uri}: {len(data)} bytes that do not match the sha256 {LATEST_POINTER} recorded")
    try:
        ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch.load of a cut file raises many kinds (zip, pickle, EOF)
        raise CorruptCheckpoint(f"{uri}: unreadable ({type(exc).__name__}: {exc})") from None
    if ckpt.get("format_version") not in READABLE_FORMATS:
        found = ckpt.get("format_version")
        raise RuntimeError(f"{uri}: checkpoint format {found} is not one of {READABLE_FORMATS}")
    return ckpt


def restore(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load the model, optimizer and RNG states of `ckpt`; the training state to continue from."""
    unwrap(model).load_state_dict(model_state(ckpt["classy_state_dict"]))
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return TrainState(ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"], list(ckpt["history"]))


def final_checkpoint(model: nn.Module, state: TrainState, cfg: Config) -> bytes:
    """`final.pt`: the trained network's state dict and the config it was trained with."""
    final = {
        "format_version": CHECKPOINT_FORMAT,
        "type": "consolidated",  # VISSL's CheckpointItemType: one file, not shards
        "classy_state_dict": vissl_classy_state(unwrap(model).state_dict()),
        "config": cfg.model_dump(mode="json"),
        "epoch": state.epoch,
        "step": state.step,
    }
    buffer = io.BytesIO()
    torch.save(final, buffer)
    return buffer.getvalue()


# VISSL's name for head i's Linear: its `mlp` head with one layer is `clf = Sequential(Linear)`.
_VISSL_HEAD = re.compile(r"(\d+)\.clf\.(\d+)\.")


def vissl_classy_state(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """A Network's state dict (`trunk.…`, `heads.<i>.…`) as VISSL's `classy_state_dict`:
    {"base_model": {"model": {"trunk": {"_feature_blocks.…": t}, "heads": {"<i>.clf.0.…": t}}, "meta": …}}."""
    trunk: dict[str, torch.Tensor] = {}
    heads: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part == "trunk":
            trunk[rest] = tensor
        elif part == "heads":
            index, _, param = rest.partition(".")
            heads[f"{index}.clf.0.{param}"] = tensor
        else:
            raise ValueError(f"{name}: VISSL's layout holds only trunk.* and heads.* parameters")
    return {"base_model": {"model": {"trunk": trunk, "heads": heads}, "meta": {"trunk": {}, "heads": []}}}


def is_vissl_layout(classy: Mapping[str, Any]) -> bool:
    """Whether `classy_state_dict` nests the network as VISSL does (base_model.model.trunk)."""
    base = classy.get("base_model")
    return isinstance(base, Mapping) and isinstance(base.get("model"), Mapping) and "trunk" in base["model"]


def model_state(classy: Mapping[str, Any]) -> dict[str, Any]:
    """`classy_state_dict` in our model's names, from VISSL's layout or from the flat one of format 1.

    From VISSL's layout as VISSL's own loader reads it for a model that is not a feature extractor:
    the trunk gets `trunk.` (a `base_model.` left by VISSL's evaluation wrapper dropped first), the
    heads `heads.`; a head that is a one-layer `mlp` (`i.clf.0.`) becomes our Linear head `i.`."""
    if not is_vissl_layout(classy):
        return dict(classy)
    model = classy["base_model"]["model"]
    names = {f"trunk.{key.removeprefix('base_model.')}": value for key, value in model["trunk"].items()}
    heads = model.get("heads")
    heads = heads if isinstance(heads, Mapping) else {}  # VISSL's FSDP runs store a list of shards
    layers: dict[str, set[str]] = {}
    for key in heads:
        if match := _VISSL_HEAD.match(key):
            layers.setdefault(match[1], set()).add(match[2])
    for key, value in heads.items():
        match = _VISSL_HEAD.match(key)
        if match and layers[match[1]] == {"0"}:
            key = f"{match[1]}.{key[match.end() :]}"
        names[f"heads.{key}"] = value
    return names
