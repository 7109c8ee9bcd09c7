r"""Step 2: a network from scratch on the cluster labels (VISSL's ClusterFit recipe).

    clusterfit train config=quickstart
    clusterfit train config=pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet \
        config.DATA.TRAIN.LABEL_PATHS=[labels.npy]
    torchrun --nproc-per-node 8 -m clusterfit train config=...

Head size NUM_CLUSTERS; SGD with momentum, no weight decay on BatchNorm, LR scaled by global
batch / 256, warm-up when multi-node, step schedule; RandomResizedCrop, ColorJitter, flip. DDP
across ranks; bf16 autocast and channels_last on CUDA. Labels are checked before the first step.
Writes `train/final.pt`, `train/metrics.jsonl`, checkpoints under `train/checkpoints/`.
"""

from __future__ import annotations

import numpy as np
import torch

from clusterfit import artifacts, distributed
from clusterfit.artifacts.layout import TRAIN
from clusterfit.config import Config
from clusterfit.data import build_dataset, dataset_identity, train_transform
from clusterfit.labels import load_labels
from clusterfit.models import build_network
from clusterfit.storage import open_store
from clusterfit.training import FitJob, FitResult, LabelledDataset, fit


def passthrough(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, labels


def fingerprint(cfg: Config, labels_digest: str) -> str:
    tree = {
        "trunk": cfg.MODEL.TRUNK.model_dump(),
        "optimizer": cfg.OPTIMIZER.model_dump(mode="json"),
        "data": dataset_identity(cfg, "TRAIN"),
        "batch": cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        "transforms": cfg.DATA.TRANSFORMS.model_dump(),
        "num_clusters": cfg.CLUSTERFIT.NUM_CLUSTERS,
        "seed": cfg.EXPERIMENT.SEED,
        "world_size": cfg.DISTRIBUTED.world_size,
    }
    return artifacts.fingerprint("train", tree, {"labels": labels_digest})


def run(cfg: Config) -> FitResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    images = build_dataset(cfg, "TRAIN", train_transform(cfg.DATA.TRANSFORMS))
    # Labels first: a bad label file fails here, before any model is built.
    labels, source, digest = load_labels(cfg, store, len(images), images.source)
    fp = fingerprint(cfg, digest)
    if artifacts.skip_if_published(store, TRAIN, fp, "train"):
        return FitResult(TRAIN, skipped=True)
    # Images with a pseudo-label (-1: skipped at extraction) and a fresh network with a K-way head.
    keep = np.flatnonzero(labels >= 0)
    dataset = torch.utils.data.Subset(LabelledDataset(images, labels), keep.tolist())
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    model = build_network(cfg.MODEL.TRUNK, [cfg.CLUSTERFIT.NUM_CLUSTERS])
    # Training: resumed from the latest checkpoint, published as train/final.pt.
    job = FitJob(
        step="train",
        folder=TRAIN,
        model=model,
        dataset=dataset,
        batch_fn=passthrough,
        optimizer_cfg=cfg.OPTIMIZER,
        batch_size=cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        fingerprint=fp,
        inputs={"labels": digest},
        extra={"labels": source, "num_images": len(keep), "num_clusters": cfg.CLUSTERFIT.NUM_CLUSTERS},
    )
    return fit(cfg, store, job, dist)
