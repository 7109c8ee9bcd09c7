"""Training shared by pretrain (RotNet) and train (ClusterFit): optimizer, LR schedule, epoch order,
one epoch, and `fit()`, the whole of a training step.

`fit()` reads top to bottom: wrap for DDP, resume from the latest checkpoint, run the epochs
(checkpointing every CHECKPOINT_FREQUENCY epochs and every CHECKPOINT_ITER_FREQUENCY steps, and on
SIGTERM), then rank 0 writes final.pt and metrics.jsonl and publishes `_SUCCESS.json`. Plain
functions that take every object explicitly (torchvision's references/classification shape).

An image DATA.ON_BAD_IMAGE=skip skipped arrives blank: it stays in its batch (every rank keeps
stepping together) but out of the loss and the accuracy, and each epoch's row of metrics.jsonl, its
log line and the summary count the skipped images per reason, over all ranks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterable, Sized
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from clusterfit import artifacts, distributed
from clusterfit.artifacts.layout import FINAL_CHECKPOINT, METRICS_LOG, SKIPPED_BY_REASON_KEY
from clusterfit.checkpoint import TrainState, final_checkpoint, load_latest, make_checkpoint, restore, save_checkpoint
from clusterfit.config import Config, OptimizerConfig
from clusterfit.image_files import REASONS, count_reasons
from clusterfit.models import amp_enabled
from clusterfit.runtime import Interrupted, progress
from clusterfit.storage import Store

log = logging.getLogger(__name__)

# (images, targets) -> (inputs, targets) on the device: RotNet rotates here, ClusterFit passes through. The
# inputs are the batch once or k times over (RotNet's four rotations), block by block.
BatchFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
IGNORE = -100  # nn.CrossEntropyLoss's ignore_index: the target of a skipped image


class LabelledImages(Sized, Protocol):
    """A map-style dataset of (image, target, problem): problem "" for an image that was read, else why it
    was skipped (clusterfit.image_files.REASONS)."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]: ...


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


def peak_lr(opt: OptimizerConfig, global_batch: float) -> float:
    """BASE_LR scaled linearly by global batch / BASE_LR_BATCH_SIZE (Goyal et al.) when AUTO_SCALE_LR."""
    return opt.BASE_LR * global_batch / opt.BASE_LR_BATCH_SIZE if opt.AUTO_SCALE_LR else opt.BASE_LR


def lr_at(epoch: float, opt: OptimizerConfig, global_batch: int, num_nodes: int) -> float:
    """LR at a fractional epoch: VISSL's composite schedule (linear warm-up, then x GAMMA at each milestone).

    The LR is set once per epoch (VISSL's update_interval epoch), and the warm-up goes from the LR of one
    node's batch (global_batch / num_nodes) to the scaled LR, so it vanishes on one node.
    """
    top = peak_lr(opt, global_batch)
    epoch = math.floor(epoch)
    if epoch < opt.WARMUP_EPOCHS:
        start = peak_lr(opt, global_batch / num_nodes)
        return start + (top - start) * epoch / opt.WARMUP_EPOCHS
    return top * opt.GAMMA ** sum(epoch >= m for m in opt.MILESTONES)


def epoch_batches(n: int, epoch: int, seed: int, rank: int, world: int, batch: int, skip: int = 0) -> list[list[int]]:
    """This rank's batches of epoch `epoch`: a seeded permutation, an equal share per rank, full batches only."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    share = order[rank::world][: n // world]
    batches = [share[i : i + batch] for i in range(0, len(share) - batch + 1, batch)]
    return batches[skip:]


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


@dataclass
class EpochContext:
    """The fixed objects one epoch needs (passed explicitly, no hidden state)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    device: torch.device
    amp: bool
    lr_fn: Callable[[float], float]  # fractional epoch -> learning rate
    batches_per_epoch: int
    batch_fn: BatchFn
    on_step: Callable[[TrainState], None]  # step-frequency checkpoints and SIGTERM
    progress_interval_s: float = 30.0
    memory_format: torch.memory_format = torch.contiguous_format


def train_one_epoch(
    ctx: EpochContext, loader: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]], state: TrainState, epoch: int
) -> dict[str, Any]:
    """One pass over `loader`; returns mean loss, top-1 on the training targets, images/s, the last LR, and
    this rank's skipped images per reason."""
    ctx.model.train()
    total_loss, correct, seen, lr, start = 0.0, 0, 0, 0.0, time.perf_counter()
    skipped: list[str] = []
    todo = ctx.batches_per_epoch - state.step_in_epoch
    for images, targets, problems in progress(loader, todo, f"epoch {epoch}", ctx.progress_interval_s, "step"):
        on_device = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
        inputs, labels = ctx.batch_fn(*on_device)
        bad = [p for p in problems if p]
        if bad:  # blank images: out of the loss and the accuracy
            skipped += bad
            labels = ignore_skipped(labels, problems)
        kept = len(labels) // len(problems) * (len(problems) - len(bad))
        inputs = inputs.contiguous(memory_format=ctx.memory_format)
        lr = ctx.lr_fn(epoch + state.step_in_epoch / ctx.batches_per_epoch)
        for group in ctx.optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.amp):
            logits = ctx.model(inputs)
            # A batch of skipped images only still steps (DDP's ranks step together), with a zero loss.
            loss = ctx.loss_fn(logits.float(), labels) if kept else logits.float().sum() * 0.0
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"epoch {epoch} step {state.step}: loss is {loss.item()} (lower OPTIMIZER.BASE_LR?)"
            )
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.optimizer.step()
        state.step += 1
        state.step_in_epoch += 1
        total_loss += loss.item() * kept
        correct += int((logits.argmax(1) == labels).sum())
        seen += kept
        ctx.on_step(state)
    elapsed = time.perf_counter() - start
    seen_or_1 = max(seen, 1)
    speed = seen / max(elapsed, 1e-9)
    return {
        "loss": total_loss / seen_or_1,
        "top1": 100.0 * correct / seen_or_1,
        "images_per_s": speed,
        "lr": lr,
        SKIPPED_BY_REASON_KEY: count_reasons(skipped),
    }


def ignore_skipped(labels: torch.Tensor, problems: list[str]) -> torch.Tensor:
    """`labels` (k x B, the batch's B images k times over, block by block) with IGNORE for the skipped images."""
    skipped = torch.tensor([bool(p) for p in problems], device=labels.device)
    return labels.masked_fill(skipped.repeat(len(labels) // len(problems)), IGNORE)


# ---------------------------------------------------------------------------------------------
# A whole training step: pretrain and train differ only in their FitJob.


@dataclass
class FitJob:
    """What differs between pretrain and train."""

    step: str  # "pretrain" or "train"
    folder: str
    model: nn.Module
    dataset: LabelledImages
    batch_fn: BatchFn
    optimizer_cfg: OptimizerConfig
    batch_size: int
    fingerprint: str
    inputs: dict[str, str]
    extra: dict[str, Any]


@dataclass
class FitResult:
    folder: str
    skipped: bool
    resumed_from_epoch: int = -1
    history: list[dict[str, Any]] | None = None


class LabelledDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int, str]]):
    """(image, target, problem) from an ImageDataset and one int target per dataset index."""

    def __init__(self, images: Any, targets: Any) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        image, _, problem = self.images[index]
        return image, int(self.targets[index]), problem


def fit(cfg: Config, store: Store, job: FitJob, dist: distributed.Dist) -> FitResult:
    log.info("%s: writing to %s", job.step, store.uri(job.folder))
    started = time.time()
    # The model on its device (DDP across ranks), its optimizer, and the state to continue from.
    model = job.model.to(dist.device)
    if cfg.MODEL.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size > 1:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    optimizer = build_optimizer(model, job.optimizer_cfg)
    state, resumed = resume(cfg, store, job, model, optimizer)
    # The epochs, each from its own seeded order; checkpoints as configured.
    ctx = epoch_context(cfg, store, job, model, optimizer, dist)
    num_epochs = job.optimizer_cfg.NUM_EPOCHS
    for epoch in range(state.epoch, num_epochs):
        batches = epoch_batches(
            len(job.dataset),
            epoch,
            cfg.EXPERIMENT.SEED,
            dist.rank,
            dist.world_size,
            job.batch_size,
            state.step_in_epoch,
        )
        loader: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]] = torch.utils.data.DataLoader(
            job.dataset,  # type: ignore[arg-type]  # any map-style dataset of (image, target)
            batch_sampler=batches,
            num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
            pin_memory=dist.device.type == "cuda",
        )
        stats = train_one_epoch(ctx, loader, state, epoch)
        skipped = skipped_on_all_ranks(stats.pop(SKIPPED_BY_REASON_KEY), dist.device)
        stats.update({SKIPPED_BY_REASON_KEY: skipped} if skipped else {})
        state.epoch, state.step_in_epoch = epoch + 1, 0
        state.history.append({"epoch": epoch + 1, "step": state.step, **stats})
        log.info("%s epoch %d/%d: %s", job.step, epoch + 1, num_epochs, epoch_summary(stats))
        due = (epoch + 1) % cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or epoch + 1 == num_epochs
        if dist.is_main and due:
            save_checkpoint(store, job.folder, make_checkpoint(model, optimizer, state, cfg, job.fingerprint))
            write_metrics(store, job.folder, state.history)
    # Publication: rank 0 writes final.pt and the metrics, then _SUCCESS.json.
    if dist.is_main:
        publish(cfg, store, job, model, state, started)
    distributed.barrier()
    return FitResult(job.folder, False, resumed, state.history)


def epoch_summary(stats: dict[str, Any]) -> str:
    speed = f"lr {stats['lr']:.4g}, {stats['images_per_s']:.0f} samples/s"
    skipped = stats.get(SKIPPED_BY_REASON_KEY)
    bad = f"; {sum(skipped.values())} images skipped (DATA.ON_BAD_IMAGE=skip), by reason {skipped}" if skipped else ""
    return f"loss {stats['loss']:.4f}, top-1 {stats['top1']:.2f}%, {speed}{bad}"


def skipped_on_all_ranks(counts: dict[str, int], device: torch.device) -> dict[str, int]:
    """Skipped images per reason, summed over every rank."""
    totals = distributed.all_sum([counts.get(reason, 0) for reason in REASONS], device)
    return {reason: n for reason, n in zip(REASONS, totals, strict=True) if n}


def skipped_in_one_pass(history: list[dict[str, Any]]) -> dict[str, int]:
    """Per reason, the most images one epoch (one pass over the images) skipped."""
    most: dict[str, int] = {}
    for row in history:
        for reason, n in row.get(SKIPPED_BY_REASON_KEY, {}).items():
            most[reason] = max(most.get(reason, 0), n)
    return dict(sorted(most.items()))


def resume(
    cfg: Config, store: Store, job: FitJob, model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[TrainState, int]:
    """The state in the latest checkpoint of this job's config and inputs, and its epoch (-1: from scratch)."""
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    if not cfg.CHECKPOINT.AUTO_RESUME:
        return TrainState(), -1
    ckpt = load_latest(store, job.folder)
    if ckpt is None:
        return TrainState(), -1
    if ckpt.get("fingerprint") != job.fingerprint:
        where = store.uri(job.folder)
        log.warning(
            "%s: the checkpoint at %s belongs to another config or input; starting from scratch", job.step, where
        )
        return TrainState(), -1
    state = restore(ckpt, model, optimizer)
    log.info("%s: resuming from epoch %d, step %d (%s)", job.step, state.epoch, state.step, store.uri(job.folder))
    return state, state.epoch


def epoch_context(
    cfg: Config, store: Store, job: FitJob, model: nn.Module, optimizer: torch.optim.Optimizer, dist: distributed.Dist
) -> EpochContext:
    sigterm = SigtermFlag()
    every = cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY
    global_batch = job.batch_size * dist.world_size

    def on_step(state: TrainState) -> None:
        due = every > 0 and state.step % every == 0
        if dist.is_main and (due or sigterm.set):
            save_checkpoint(store, job.folder, make_checkpoint(model, optimizer, state, cfg, job.fingerprint))
        if sigterm.set:
            raise StopRequested(f"{job.step}: stopped by SIGTERM at step {state.step}; a checkpoint was written")

    def lr_fn(epoch: float) -> float:
        return lr_at(epoch, job.optimizer_cfg, global_batch, cfg.DISTRIBUTED.NUM_NODES)

    return EpochContext(
        model=model,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        device=dist.device,
        amp=amp_enabled(cfg.MODEL.AMP_PARAMS.USE_AMP, dist.device),
        lr_fn=lr_fn,
        batches_per_epoch=(len(job.dataset) // dist.world_size) // job.batch_size,
        batch_fn=job.batch_fn,
        on_step=on_step,
        memory_format=torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format,
        progress_interval_s=cfg.LOG.PROGRESS_INTERVAL_S,
    )


def write_metrics(store: Store, folder: str, history: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(row) + "\n" for row in history).encode()
    store.put_bytes(f"{folder}/{METRICS_LOG}", data)
    return data


def publish(cfg: Config, store: Store, job: FitJob, model: nn.Module, state: TrainState, started: float) -> None:
    ledger = artifacts.Ledger(store, job.folder)
    ledger.put_bytes(FINAL_CHECKPOINT, final_checkpoint(model, state, cfg))
    ledger.record(METRICS_LOG, write_metrics(store, job.folder, state.history))
    artifacts.publish(
        ledger,
        step=job.step,
        config=cfg.model_dump(mode="json"),
        inputs=job.inputs,
        fingerprint_=job.fingerprint,
        started_s=started,
        extra={
            "epochs": state.epoch,
            "steps": state.step,
            SKIPPED_BY_REASON_KEY: skipped_in_one_pass(state.history),
            **job.extra,
        },
    )
    where = store.uri(f"{job.folder}/{FINAL_CHECKPOINT}")
    log.info("%s: published %s after %d epochs", job.step, where, state.epoch)
