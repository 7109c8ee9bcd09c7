r"""Step 2: a network from scratch on the cluster labels (VISSL's ClusterFit recipe).

    clusterfit train config=quickstart
    clusterfit train config=pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet \
        config.DATA.TRAIN.LABEL_PATHS=[labels.npy]
    torchrun --nproc-per-node 8 -m clusterfit train config=...

Head size NUM_CLUSTERS; SGD with momentum, no weight decay on BatchNorm, LR scaled by global
batch / 256, warm-up when multi-node, step schedule; RandomResizedCrop, ColorJitter, flip. DDP
across ranks; bf16 autocast and channels_last on CUDA. Labels are checked before the first step.
Writes `train/final.pt`, `train/metrics.jsonl`, checkpoints under `train/checkpoints/` (per K of a
sweep, `train-k<K>/`); with `supervised` in EVALUATE.BASELINES, the same network on the true labels in
`supervised/`, the upper bound for the report.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from clusterfit import artifacts, distributed
from clusterfit.artifacts.layout import SUPERVISED, train_folder
from clusterfit.config import Config, ConfigError
from clusterfit.data import ImageSource, build_dataset, dataset_identity, images_identity, train_transform
from clusterfit.labels import load_labels
from clusterfit.models import build_network
from clusterfit.results import Results, one_or_all
from clusterfit.storage import open_store, sha256_bytes
from clusterfit.training import FitJob, FitResult, LabelledDataset, fit


def passthrough(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images, labels


def fingerprint(cfg: Config, labels_digest: str, num_classes: int) -> str:
    tree = {
        "trunk": cfg.MODEL.TRUNK.model_dump(),
        "optimizer": cfg.OPTIMIZER.model_dump(mode="json"),
        "data": dataset_identity(cfg, "TRAIN"),
        "batch": cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        "transforms": cfg.DATA.TRANSFORMS.model_dump(),
        "num_clusters": num_classes,
        "seed": cfg.EXPERIMENT.SEED,
        "world_size": cfg.DISTRIBUTED.world_size,
    }
    return artifacts.fingerprint("train", tree, {"labels": labels_digest})


def run(cfg: Config) -> FitResult | Results:
    """One network per K the experiment covers (train/, or train-k<K>/ in a sweep), then the supervised upper
    bound (supervised/) when EVALUATE.BASELINES asks for it."""
    results = [train(cfg.with_num_clusters(k)) for k in cfg.CLUSTERFIT.cluster_counts]
    if "supervised" in cfg.EVALUATE.BASELINES:
        results.append(train(cfg, supervised=True))
    return one_or_all(results)


def train(cfg: Config, supervised: bool = False) -> FitResult:
    """A fresh network on cfg's K cluster labels (or, `supervised`, on the true labels), resumable, published."""
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND, cfg.DISTRIBUTED.TIMEOUT_S)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    images = build_dataset(cfg, "TRAIN", train_transform(cfg.DATA.TRANSFORMS))
    # Labels first: a bad label file fails here, before any model is built.
    if supervised:
        labels, source, digest = true_labels(images.source)
        folder, num_classes = SUPERVISED, int(labels.max()) + 1
    else:
        labels, source, digest = load_labels(cfg, store, len(images), images.source)
        folder, num_classes = train_folder(cfg), cfg.CLUSTERFIT.NUM_CLUSTERS
    fp = fingerprint(cfg, digest, num_classes)
    if artifacts.skip_if_published(store, folder, fp, "train"):
        return FitResult(folder, skipped=True)
    # Images with a pseudo-label (-1: skipped at extraction) and a fresh network with a K-way head.
    keep = np.flatnonzero(labels >= 0)
    dataset = torch.utils.data.Subset(LabelledDataset(images, labels), keep.tolist())
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    model = build_network(cfg.MODEL.TRUNK, [num_classes])
    # Training: resumed from the latest checkpoint, published as <folder>/final.pt.
    job = FitJob(
        step="train",
        folder=folder,
        model=model,
        dataset=dataset,
        batch_fn=passthrough,
        optimizer_cfg=cfg.OPTIMIZER,
        batch_size=cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA,
        fingerprint=fp,
        inputs={"labels": digest},
        extra={"labels": source, "num_images": len(keep), "num_clusters": num_classes},
    )
    return fit(cfg, store, job, dist)


def true_labels(source: ImageSource) -> tuple[np.ndarray, str, str]:
    """The dataset's ground truth as training labels: (labels, what they are, digest)."""
    if source.targets is None:
        raise ConfigError(
            "EVALUATE.BASELINES has supervised, which trains on the true TRAIN labels, and DATA.TRAIN has none"
        )
    labels = np.asarray(source.targets, dtype=np.int64)
    identity = images_identity(source)
    digest = sha256_bytes(json.dumps(identity, sort_keys=True).encode() + labels.tobytes())
    return labels, "ground truth of DATA.TRAIN", digest
