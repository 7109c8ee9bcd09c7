"""Step 3: does ClusterFit beat the features it started from? One protocol for every model.

    clusterfit evaluate config=quickstart

For each model (the starting model, the ClusterFit model, and the baselines: a randomly
initialised trunk and raw pixels) and each layer in EVALUATE.LAYERS: kNN top-1 (cosine,
temperature-weighted votes, k=KNN_K) and a linear probe's top-1 on frozen features, trained on
TRAIN and measured on TEST; with EVALUATE.LOW_SHOT, kNN top-1 again with only n labelled TRAIN
images per class (the mean over LOW_SHOT_DRAWS random subsets, the same subsets for every model),
where a representation's quality shows long before full-data kNN saturates. NMI and ARI of the
cluster labels against ground truth. A difference is called real only when it exceeds twice its
standard error: the TEST set's binomial error, plus the spread over the draws for low-shot
(`probes` has the measures). Writes `eval/metrics.json` and the run report (`eval/report.html`,
`eval/report.md`, PNGs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from clusterfit import artifacts, distributed, report
from clusterfit.artifacts.layout import (
    EVAL,
    EVAL_METRICS,
    FINAL_CHECKPOINT,
    LABELS,
    REPORT_HTML,
    TRAIN,
    cluster_folder,
    split_file,
)
from clusterfit.artifacts.lineage import StartWeights, start_weights
from clusterfit.config import Config, ConfigError
from clusterfit.data import ImageDataset, build_dataset, dataset_identity, eval_transform
from clusterfit.models import Network, build_network, forward_features, memory_format
from clusterfit.probes import agreement, check_low_shot, compare, low_shot_subsets, measure
from clusterfit.storage import Store, open_store
from clusterfit.weights import load_weights, starting_model

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    folder: str
    skipped: bool
    metrics: dict[str, Any] | None = field(default=None, repr=False)  # in eval/metrics.json; too long for a log line
    summary: list[str] = field(default_factory=list, repr=False)  # the report's verdict lines


def run(cfg: Config) -> EvalResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    if not dist.is_main:  # evaluation is small next to training: rank 0 does it
        return EvalResult(EVAL, True)
    # Inputs: the starting weights, the ClusterFit network and the clusters, all published.
    start = start_weights(cfg, store)
    train_manifest = artifacts.read_manifest(store, TRAIN)
    cluster_manifest = artifacts.read_manifest(store, cluster_folder(cfg))
    inputs = {
        "start": start.digest or start.uri,
        "train": train_manifest["_digest"],
        "cluster": cluster_manifest["_digest"],
    }
    fp = fingerprint(cfg, inputs)
    if artifacts.skip_if_published(store, EVAL, fp, "evaluate"):
        metrics = artifacts.load_json(store, EVAL, EVAL_METRICS, artifacts.read_manifest(store, EVAL))
        return EvalResult(EVAL, True, metrics, report.summary_lines(metrics))
    log.info("evaluate: writing to %s", store.uri(EVAL))
    started = time.time()
    # Ground truth of both splits, and the labelled subsets every model's low-shot kNN shares.
    train_set = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    test_set = build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS))
    y_train, y_test = ground_truth(train_set, "TRAIN"), ground_truth(test_set, "TEST")
    subsets = low_shot_subsets(y_train, cfg.EVALUATE.LOW_SHOT, cfg.EVALUATE.LOW_SHOT_DRAWS, cfg.EXPERIMENT.SEED)
    # Features of every model on both splits, then the probes.
    rows = []
    for name, model in models(cfg, store, start).items():
        for layer, (x_train, x_test) in features(cfg, model, train_set, test_set, dist.device).items():
            train, test = (x_train, y_train), (x_test, y_test)
            rows.append(measure(cfg.EVALUATE, cfg.EXPERIMENT.SEED, name, layer, train, test, subsets, dist.device))
            log.info("evaluate %s/%s: %s", name, layer, row_summary(rows[-1]))
    # Verdicts, metrics.json and the report, then _SUCCESS.json.
    metrics = {
        "rows": rows,
        "clusters": cluster_agreement(store, cfg, cluster_manifest, y_train, y_test),
        "comparison": compare(rows, len(y_test)),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "start_weights": start.uri or "random init",
    }
    ledger = artifacts.Ledger(store, EVAL)
    ledger.put_json(EVAL_METRICS, metrics)
    report.write(cfg, store, ledger, metrics)
    config = cfg.model_dump(mode="json")
    artifacts.publish(ledger, step="evaluate", config=config, inputs=inputs, fingerprint_=fp, started_s=started)
    log.info("evaluate: report at %s", store.uri(f"{EVAL}/{REPORT_HTML}"))
    return EvalResult(EVAL, False, metrics, report.summary_lines(metrics))


def fingerprint(cfg: Config, inputs: dict[str, str]) -> str:
    tree = {
        "EVALUATE": cfg.EVALUATE.model_dump(mode="json"),
        "test": dataset_identity(cfg, "TEST"),
        "train": dataset_identity(cfg, "TRAIN"),
        "seed": cfg.EXPERIMENT.SEED,
    }
    return artifacts.fingerprint("evaluate", tree, inputs)


def row_summary(row: dict[str, Any]) -> str:
    low = "".join(f", {n}-shot kNN {v['top1']:.2f}%" for n, v in row["low_shot"].items())
    return f"kNN top-1 {row['knn_top1']:.2f}%{low}, linear top-1 {row['linear_top1']:.2f}%"


def preflight(cfg: Config) -> None:
    """What `clusterfit run` checks before its first step, so evaluate cannot fail on its settings after hours of
    training."""
    y_train = ground_truth(build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS)), "TRAIN")
    ground_truth(build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS)), "TEST")
    check_low_shot(y_train, cfg.EVALUATE.LOW_SHOT)


def ground_truth(dataset: ImageDataset, partition: str) -> np.ndarray:
    if dataset.source.targets is None:
        raise ConfigError(
            f"DATA.{partition}: the evaluate step needs ground-truth labels, and this dataset has none "
            "(drop evaluate from PIPELINE.STEPS)"
        )
    return np.asarray(dataset.source.targets, dtype=np.int64)


def models(cfg: Config, store: Store, start: StartWeights) -> dict[str, Network | None]:
    """name -> network (None: raw pixels). The order is the report's row order."""
    out: dict[str, Network | None] = {}
    if "pixels" in cfg.EVALUATE.BASELINES:
        out["pixels"] = None
    if "random" in cfg.EVALUATE.BASELINES:
        torch.manual_seed(cfg.EXPERIMENT.SEED + 1)
        out["random"] = build_network(cfg.MODEL.TRUNK)
    if not start.random:
        out["start"] = starting_model(cfg, start)
    clusterfit = build_network(cfg.MODEL.TRUNK)
    ours = {"PARAMS_FILE": store.uri(f"{TRAIN}/{FINAL_CHECKPOINT}"), "STATE_DICT_KEY_NAME": "classy_state_dict"}
    options = cfg.MODEL.WEIGHTS_INIT.model_copy(update={**ours, "REMOVE_PREFIX": "", "APPEND_PREFIX": ""})
    load_weights(clusterfit, options, cfg.STORAGE)
    out["clusterfit"] = clusterfit
    return out


def features(
    cfg: Config, model: Network | None, train_set: ImageDataset, test_set: ImageDataset, device: torch.device
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (train features, test features)}; raw pixels when model is None."""
    layers: list[str] = ["pixels"] if model is None else list(cfg.EVALUATE.LAYERS)
    if model is not None:
        model.to(device).to(memory_format=memory_format(cfg.MODEL.CHANNELS_LAST)).eval()
    both = [in_memory(cfg, model, dataset, layers, device) for dataset in (train_set, test_set)]
    return {layer: (both[0][layer], both[1][layer]) for layer in layers}


def in_memory(
    cfg: Config, model: Network | None, dataset: ImageDataset, layers: list[str], device: torch.device
) -> dict[str, np.ndarray]:
    batch, workers = cfg.DATA.TEST.BATCHSIZE_PER_REPLICA, cfg.DATA.NUM_DATALOADER_WORKERS
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers)
    fmt = memory_format(cfg.MODEL.CHANNELS_LAST)
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for images, _, _ in loader:
        if model is None:
            parts["pixels"].append(pixel_features(images, cfg.EVALUATE.PIXELS_SIZE))
            continue
        for layer, array in forward_features(model, images.to(device), layers, cfg.EXTRACT.POOL_SIZE, fmt).items():
            parts[layer].append(array)
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def pixel_features(images: torch.Tensor, size: int) -> np.ndarray:
    """(B, C, H, W) -> float32 (B, C * h * w), h, w <= size: the raw-pixel baseline, average-pooled so
    that it stays small at any image size (3 x 224 x 224 pixels would be 150,528 dims per image)."""
    height, width = images.shape[-2:]
    if max(height, width) > size:
        images = F.adaptive_avg_pool2d(images, (min(size, height), min(size, width)))
    return images.flatten(1).float().numpy()


def cluster_agreement(
    store: Store, cfg: Config, manifest: dict[str, Any], y_train: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """NMI and ARI of the cluster labels against ground truth, per split (images without a label excluded)."""
    folder = cluster_folder(cfg)
    main_split = cfg.CLUSTERFIT.FEATURES.DATA_PARTITION
    out: dict[str, Any] = {}
    for split, truth in (("TRAIN", y_train), ("TEST", y_test)):
        name = split_file(split, LABELS, main_split)
        if name not in manifest["files"]:
            continue
        out[split] = agreement(truth, artifacts.load_array(store, folder, name, manifest))
    return out
