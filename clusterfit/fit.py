"""The training run shared by pretrain (RotNet) and train (ClusterFit): resume, epochs, publish.

`fit()` reads top to bottom: wrap for DDP, resume from the latest checkpoint, run the epochs
(checkpointing every CHECKPOINT_FREQUENCY epochs and every CHECKPOINT_ITER_FREQUENCY steps),
then rank 0 writes final.pt and metrics.jsonl and publishes `_SUCCESS.json`.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clusterfit import artifacts, distributed, training
from clusterfit.config import Config, OptimizerConfig
from clusterfit.storage import Store

log = logging.getLogger(__name__)


@dataclass
class FitJob:
    """What differs between pretrain and train."""

    step: str  # "pretrain" or "train"
    folder: str
    model: nn.Module
    dataset: Any  # a sized map-style dataset of (image, target)
    step_fn: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
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


class LabelledDataset(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """(image, target) pairs from an ImageDataset and one int target per dataset index."""

    def __init__(self, images: Any, targets: Any) -> None:
        self.images = images
        self.targets = targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, _, _ = self.images[index]
        return image, int(self.targets[index])


def published(store: Store, step: str, folder: str, fingerprint: str) -> FitResult | None:
    """A skip result when the folder is published with this fingerprint, else None."""
    if not artifacts.is_published(store, folder, fingerprint):
        return None
    log.info("%s: already published at %s with the same config and inputs; skipping", step, store.uri(folder))
    return FitResult(folder, True)


def fit(cfg: Config, store: Store, job: FitJob, dist: distributed.Dist) -> FitResult:
    if done := published(store, job.step, job.folder, job.fingerprint):
        return done
    log.info("%s: writing to %s", job.step, store.uri(job.folder))
    started = time.time()
    model = job.model.to(dist.device)
    if cfg.MODEL.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if dist.world_size > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    optimizer = training.build_optimizer(model, job.optimizer_cfg)
    state, resumed = resume(cfg, store, job, model, optimizer)
    ctx = epoch_context(cfg, store, job, model, optimizer, dist)
    for epoch in range(state.epoch, job.optimizer_cfg.NUM_EPOCHS):
        batches = training.epoch_batches(
            len(job.dataset), epoch, cfg.EXPERIMENT.SEED, dist.rank, dist.world_size, job.batch_size, skip=state.step_in_epoch
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            job.dataset, batch_sampler=batches, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS, pin_memory=dist.device.type == "cuda"
        )  # fmt: skip
        stats = training.train_one_epoch(ctx, loader, state, epoch)
        state.epoch, state.step_in_epoch = epoch + 1, 0
        state.history.append({"epoch": epoch + 1, "step": state.step, **stats})
        log.info("%s epoch %d/%d: loss %.4f, top-1 %.2f%%, lr %.4g, %.0f samples/s", job.step, epoch + 1,
                 job.optimizer_cfg.NUM_EPOCHS, stats["loss"], stats["top1"], stats["lr"], stats["images_per_s"])  # fmt: skip
        last = epoch + 1 == job.optimizer_cfg.NUM_EPOCHS
        if dist.is_main and ((epoch + 1) % cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 0 or last):
            training.save_checkpoint(store, job.folder, with_fp(training.make_checkpoint(model, optimizer, None, state, cfg), job))
            write_metrics(store, job.folder, state.history)
    if dist.is_main:
        publish(cfg, store, job, model, state, started)
    distributed.barrier()
    return FitResult(job.folder, False, resumed, state.history)


def with_fp(ckpt: dict[str, Any], job: FitJob) -> dict[str, Any]:
    ckpt["fingerprint"] = job.fingerprint
    return ckpt


def resume(cfg: Config, store: Store, job: FitJob, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[training.TrainState, int]:
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    if not cfg.CHECKPOINT.AUTO_RESUME:
        return training.TrainState(), -1
    ckpt = training.load_latest(store, job.folder)
    if ckpt is None:
        return training.TrainState(), -1
    if ckpt.get("fingerprint") != job.fingerprint:
        log.warning("%s: the checkpoint at %s belongs to another config or input; starting from scratch", job.step, store.uri(job.folder))
        return training.TrainState(), -1
    state = training.restore(ckpt, model, optimizer, None)
    log.info("%s: resuming from epoch %d, step %d (%s)", job.step, state.epoch, state.step, store.uri(job.folder))
    return state, state.epoch


def epoch_context(
    cfg: Config, store: Store, job: FitJob, model: nn.Module, optimizer: torch.optim.Optimizer, dist: distributed.Dist
) -> training.EpochContext:
    sigterm = training.SigtermFlag()
    every = cfg.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY
    global_batch = job.batch_size * dist.world_size

    def on_step(state: training.TrainState) -> None:
        due = every > 0 and state.step % every == 0
        if dist.is_main and (due or sigterm.set):
            training.save_checkpoint(store, job.folder, with_fp(training.make_checkpoint(model, optimizer, None, state, cfg), job))
        if sigterm.set:
            raise training.StopRequested(f"{job.step}: stopped by SIGTERM at step {state.step}; a checkpoint was written")

    return training.EpochContext(
        model=model,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        device=dist.device,
        amp=dist.device.type == "cuda" and cfg.MODEL.AMP_PARAMS.USE_AMP,
        lr_fn=lambda epoch: training.lr_at(epoch, job.optimizer_cfg, global_batch, cfg.DISTRIBUTED.NUM_NODES),
        batches_per_epoch=(len(job.dataset) // dist.world_size) // job.batch_size,
        step_fn=job.step_fn,
        on_step=on_step,
        memory_format=torch.channels_last if cfg.MODEL.CHANNELS_LAST else torch.contiguous_format,
        progress_interval_s=cfg.LOG.PROGRESS_INTERVAL_S,
    )


def write_metrics(store: Store, folder: str, history: list[dict[str, Any]]) -> bytes:
    data = "".join(json.dumps(row) + "\n" for row in history).encode()
    store.put_bytes(f"{folder}/metrics.jsonl", data)
    return data


def publish(cfg: Config, store: Store, job: FitJob, model: nn.Module, state: training.TrainState, started: float) -> None:
    ledger = artifacts.Ledger(store, job.folder)
    final = {
        "format_version": training.CHECKPOINT_FORMAT,
        "classy_state_dict": training.unwrap(model).state_dict(),
        "config": cfg.model_dump(mode="json"),
        "epoch": state.epoch,
        "step": state.step,
    }
    buffer = io.BytesIO()
    torch.save(final, buffer)
    ledger.put_bytes("final.pt", buffer.getvalue())
    ledger.record("metrics.jsonl", write_metrics(store, job.folder, state.history))
    artifacts.publish(
        ledger, step=job.step, config=cfg.model_dump(mode="json"), inputs=job.inputs, fingerprint_=job.fingerprint,
        started_s=started, extra={"epochs": state.epoch, "steps": state.step, **job.extra},
    )  # fmt: skip
    log.info("%s: published %s (final.pt after %d epochs)", job.step, store.uri(job.folder), state.epoch)
