"""Training checkpoints: one dict with fixed keys, written atomically, resumed automatically.

The checkpoint object is written first, then the `latest.json` pointer is moved to it, so a reader
never sees a half-written checkpoint (on S3 too); the newest KEEP_CHECKPOINTS are kept. A
restarted step resumes from the pointer (Kubernetes restarts pods; a step must just continue).
`final.pt` is the published network: its state dict under `classy_state_dict`, which
MODEL.WEIGHTS_INIT loads with its defaults, and the config it was trained with.
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterfit.artifacts.layout import CHECKPOINTS, LATEST_POINTER, checkpoint_name
from clusterfit.config import Config
from clusterfit.storage import NotFound, Store

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2


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
        "classy_state_dict": unwrap(model).state_dict(),
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
    store.put_bytes(f"{folder}/{name}", buffer.getvalue())
    pointer = {"checkpoint": name, "epoch": ckpt["epoch"], "step": ckpt["step"]}
    store.put_bytes(f"{folder}/{LATEST_POINTER}", json.dumps(pointer).encode())
    for old in sorted(store.list(f"{folder}/{CHECKPOINTS}/"))[:-KEEP_CHECKPOINTS]:
        store.delete(old)
    return name


def load_latest(store: Store, folder: str) -> dict[str, Any] | None:
    """The checkpoint `latest.json` points at, or None when there is none yet."""
    try:
        pointer = json.loads(store.get_bytes(f"{folder}/{LATEST_POINTER}"))
    except NotFound:
        return None
    data = store.get_bytes(f"{folder}/{pointer['checkpoint']}")
    ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        found = ckpt.get("format_version")
        raise RuntimeError(f"{store.uri(folder)}: checkpoint format {found} is not {CHECKPOINT_FORMAT}")
    return ckpt


def restore(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load the model, optimizer and RNG states of `ckpt`; the training state to continue from."""
    unwrap(model).load_state_dict(ckpt["classy_state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    return TrainState(ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"], list(ckpt["history"]))


def final_checkpoint(model: nn.Module, state: TrainState, cfg: Config) -> bytes:
    """`final.pt`: the trained network's state dict and the config it was trained with."""
    final = {
        "format_version": CHECKPOINT_FORMAT,
        "classy_state_dict": unwrap(model).state_dict(),
        "config": cfg.model_dump(mode="json"),
        "epoch": state.epoch,
        "step": state.step,
    }
    buffer = io.BytesIO()
    torch.save(final, buffer)
    return buffer.getvalue()
