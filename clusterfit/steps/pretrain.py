"""Step 0 (optional): RotNet from scratch, so a run needs no downloaded weights.

    clusterfit pretrain config=quickstart
    clusterfit pretrain config=quickstart config.PRETRAIN.OPTIMIZER.NUM_EPOCHS=2

Each image is shown at 0, 90, 180 and 270 degrees and a 4-way head learns which (Gidaris et al.,
ICLR 2018). Writes `pretrain/final.pt`, a checkpoint that MODEL.WEIGHTS_INIT loads with its
defaults (the state dict under `classy_state_dict`, VISSL's parameter names).
"""

from __future__ import annotations

import torch

from clusterfit import artifacts, distributed
from clusterfit.artifacts.layout import PRETRAIN
from clusterfit.config import Config
from clusterfit.data import build_dataset, dataset_identity, train_transform
from clusterfit.models import build_network
from clusterfit.storage import open_store
from clusterfit.training import FitJob, FitResult, LabelledDataset, fit

NUM_ROTATIONS = 4


def rotate_batch(images: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W) rotated by 0/90/180/270 degrees, and labels 0..3."""
    rotated = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


def fingerprint(cfg: Config) -> str:
    tree = {
        "trunk": cfg.MODEL.TRUNK.model_dump(),
        "pretrain": cfg.PRETRAIN.model_dump(mode="json"),
        "data": dataset_identity(cfg, "TRAIN"),
        "transforms": cfg.DATA.TRANSFORMS.model_dump(),
        "seed": cfg.EXPERIMENT.SEED,
        "world_size": cfg.DISTRIBUTED.world_size,
    }
    return artifacts.fingerprint("pretrain", tree, {})


def run(cfg: Config) -> FitResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    fp = fingerprint(cfg)
    if artifacts.skip_if_published(store, PRETRAIN, fp, "pretrain"):
        return FitResult(PRETRAIN, skipped=True)
    # The images (each shown at four rotations per step) and a network with a 4-way head.
    images = build_dataset(cfg, "TRAIN", train_transform(cfg.DATA.TRANSFORMS))
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    model = build_network(cfg.MODEL.TRUNK, [NUM_ROTATIONS])
    # Training: resumed from the latest checkpoint, published as pretrain/final.pt.
    job = FitJob(
        step="pretrain",
        folder=PRETRAIN,
        model=model,
        dataset=LabelledDataset(images, [0] * len(images)),
        batch_fn=rotate_batch,
        optimizer_cfg=cfg.PRETRAIN.OPTIMIZER,
        batch_size=cfg.PRETRAIN.BATCHSIZE_PER_REPLICA,
        fingerprint=fp,
        inputs={},
        extra={"method": "rotnet", "num_images": len(images)},
    )
    return fit(cfg, store, job, dist)
