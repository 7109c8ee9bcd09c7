"""What pretrain and train share: optimizer, LR schedule, epoch order, one epoch, checkpoints.

Plain functions that take every object explicitly (torchvision's references/classification shape).
One checkpoint dict with fixed keys, written atomically: the file first, then the `latest.json`
pointer, so a reader never sees a half-written checkpoint (on S3 too). A restarted step resumes
from the pointer automatically; SIGTERM (a pod being evicted) writes one before exiting.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterfit.config import Config, OptimizerConfig
from clusterfit.runtime import Interrupted, progress
from clusterfit.storage import NotFound, Store

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2


def param_groups(model: nn.Module, opt: OptimizerConfig) -> list[dict[str, Any]]:
    """Weight decay on weights; none on BatchNorm (unless REGULARIZE_BN) or biases (unless REGULARIZE_BIAS)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for module in model.modules():
        is_bn = isinstance(module, nn.modules.batchnorm._BatchNorm)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            exempt = (is_bn and not opt.REGULARIZE_BN) or (name == "bias" and not opt.REGULARIZE_BIAS)
            (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": opt.WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(param_groups(model, opt), lr=opt.BASE_LR, momentum=opt.MOMENTUM, nesterov=opt.NESTEROV)


def peak_lr(opt: OptimizerConfig, global_batch: int) -> float:
    """BASE_LR scaled linearly by global batch / BASE_LR_BATCH_SIZE (Goyal et al.) when AUTO_SCALE_LR."""
    return opt.BASE_LR * global_batch / opt.BASE_LR_BATCH_SIZE if opt.AUTO_SCALE_LR else opt.BASE_LR


def lr_at(epoch: float, opt: OptimizerConfig, global_batch: int, num_nodes: int) -> float:
    """LR at a fractional epoch: linear warm-up (when it applies), then x GAMMA at each milestone."""
    top = peak_lr(opt, global_batch)
    warmup = opt.WARMUP_EPOCHS if (num_nodes > 1 or not opt.WARMUP_MULTI_NODE_ONLY) else 0
    if epoch < warmup:
        return top * (epoch + 1e-3) / warmup
    return top * opt.GAMMA ** sum(epoch >= m for m in opt.MILESTONES)


def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, batch: int, skip: int = 0) -> list[list[int]]:
    """This rank's batches of epoch `epoch`: a seeded permutation, an equal share per rank, full batches only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    share = order[rank::world][: n // world]
    batches = [share[i : i + batch] for i in range(0, len(share) - batch + 1, batch)]
    return batches[skip:]


@dataclass
class TrainState:
    """Everything a resumed run needs besides the model and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    step_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


class StopRequested(Interrupted):
    """SIGTERM arrived; a checkpoint was written."""


class SigtermFlag:
    """Remembers a SIGTERM so the loop can checkpoint at the next step boundary."""

    def __init__(self) -> None:
        self.set = False
        with contextlib.suppress(ValueError):  # not the main thread: no handler, nothing to remember
            signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        log.warning("SIGTERM: writing a checkpoint at the next step, then exiting")
        self.set = True


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(store: Store, folder: str, ckpt: dict[str, Any]) -> str:
    """Write the checkpoint object, then move `latest.json` to it; keep the last KEEP_CHECKPOINTS."""
    name = f"checkpoints/e{ckpt['epoch']:04d}-s{ckpt['step']:09d}.pt"
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    store.put_bytes(f"{folder}/{name}", buffer.getvalue())
    store.put_bytes(f"{folder}/latest.json", json.dumps({"checkpoint": name, "epoch": ckpt["epoch"], "step": ckpt["step"]}).encode())
    for old in sorted(store.list(f"{folder}/checkpoints/"))[:-KEEP_CHECKPOINTS]:
        store.delete(old)
    return name


def load_latest(store: Store, folder: str) -> dict[str, Any] | None:
    try:
        pointer = json.loads(store.get_bytes(f"{folder}/latest.json"))
    except NotFound:
        return None
    data = store.get_bytes(f"{folder}/{pointer['checkpoint']}")
    ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    if ckpt.get("format_version") != CHECKPOINT_FORMAT:
        raise RuntimeError(f"{store.uri(folder)}: checkpoint format {ckpt.get('format_version')} is not {CHECKPOINT_FORMAT}")
    return ckpt


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, state: TrainState, cfg: Config) -> dict[str, Any]:
    return {
        "format_version": CHECKPOINT_FORMAT,
        "classy_state_dict": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": {"kind": "step", "epoch": state.epoch, "step": state.step},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": state.epoch,
        "step": state.step,
        "step_in_epoch": state.step_in_epoch,
        "history": state.history,
        "rng": rng_state(),
        "config": cfg.model_dump(mode="json"),
    }


def restore(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> TrainState:
    unwrap(model).load_state_dict(ckpt["classy_state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    return TrainState(ckpt["epoch"], ckpt["step"], ckpt["step_in_epoch"], list(ckpt["history"]))


@dataclass
class EpochContext:
    """The fixed objects one epoch needs (passed explicitly, no hidden state)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    amp: bool
    lr_fn: Any  # (fractional epoch) -> lr
    batches_per_epoch: int
    step_fn: Any  # (images, targets) -> (inputs, targets): RotNet rotates here, ClusterFit passes through
    on_step: Any  # (state) -> None: step-frequency checkpoints and SIGTERM
    progress_interval_s: float = 30.0
    memory_format: torch.memory_format = torch.contiguous_format


def train_one_epoch(ctx: EpochContext, loader: Any, state: TrainState, epoch: int) -> dict[str, float]:
    """One pass over `loader`; returns mean loss, top-1 on the training targets and images/s."""
    ctx.model.train()
    total_loss, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    todo = ctx.batches_per_epoch - state.step_in_epoch
    for images, targets in progress(loader, todo, f"epoch {epoch}", ctx.progress_interval_s, "step"):
        inputs, labels = ctx.step_fn(images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True))
        inputs = inputs.contiguous(memory_format=ctx.memory_format)
        lr = ctx.lr_fn(epoch + state.step_in_epoch / ctx.batches_per_epoch)
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            logits = ctx.model(inputs)
            loss = ctx.loss_fn(logits.float(), labels)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"epoch {epoch} step {state.step}: loss is {loss.item()} (lower OPTIMIZER.BASE_LR?)")
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        state.step += 1
        state.step_in_epoch += 1
        total_loss += loss.item() * len(labels)
        correct += int((logits.argmax(1) == labels).sum())
        seen += len(labels)
        ctx.on_step(state)
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "top1": 100.0 * correct / max(seen, 1), "images_per_s": seen / max(elapsed, 1e-9), "lr": lr if seen else 0.0}
