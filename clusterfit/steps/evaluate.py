"""Step 3: does ClusterFit beat the features it started from? One protocol for every model.

    clusterfit evaluate config=quickstart
    clusterfit evaluate config=quickstart config.EVALUATE.PROTOCOL=vissl_linear

EVALUATE.PROTOCOL=quick (the default): for each model (the starting model, the ClusterFit model,
and the baselines: a randomly initialised trunk and raw pixels) and each layer in
EVALUATE.LAYERS: kNN top-1 (cosine,
temperature-weighted votes, k=KNN_K) and a linear probe's top-1 on frozen features, trained on
TRAIN and measured on TEST; with EVALUATE.LOW_SHOT, kNN top-1 again with only n labelled TRAIN
images per class (the mean over LOW_SHOT_DRAWS random subsets, the same subsets for every model),
where a representation's quality shows long before full-data kNN saturates.
EVALUATE.PROTOCOL=vissl_linear: VISSL's linear benchmark instead (a BN + Linear head per layer on
the frozen trunk, trained on augmented TRAIN images; EVALUATE.VISSL_LINEAR), whose numbers compare
with VISSL's model zoo. Both: NMI and ARI of the labels training used (DATA.TRAIN.LABEL_PATHS, else
the experiment's clusters) against ground truth. A difference is called real when a paired test
on the same TEST images says so (McNemar mid-p; a paired bootstrap over images and draws for
low-shot; p < EVALUATE.SIGNIFICANCE), with the spread over EVALUATE.OTHER_SEEDS when given
(`probes` has the measures). Writes `eval/metrics.json` and the run report (`eval/report.html`,
`eval/report.md`, PNGs).
"""

from __future__ import annotations

import json
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
    SUPERVISED,
    cluster_folder,
    split_file,
    train_folder,
    train_folders,
)
from clusterfit.artifacts.lineage import StartWeights, start_weights
from clusterfit.config import Config, ConfigError
from clusterfit.data import ImageDataset, build_dataset, dataset_identity, eval_transform, train_transform
from clusterfit.labels import load_labels
from clusterfit.linear_eval import train_linear_eval
from clusterfit.models import Network, build_network, forward_features, memory_format
from clusterfit.probes import (
    agreement,
    check_low_shot,
    compare,
    low_shot_subsets,
    measure,
    pack_correct,
    seed_spread,
    top1,
)
from clusterfit.storage import Store, open_store, read_uri
from clusterfit.training import LabelledDataset
from clusterfit.weights import load_weights, starting_model

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    folder: str
    skipped: bool
    metrics: dict[str, Any] | None = field(default=None, repr=False)  # in eval/metrics.json; too long for a log line
    summary: list[str] = field(default_factory=list, repr=False)  # the report's verdict lines


def run(cfg: Config) -> EvalResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND, cfg.DISTRIBUTED.TIMEOUT_S)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    if not dist.is_main:  # evaluation is small next to training: rank 0 does it
        return EvalResult(EVAL, True)
    # Inputs: the starting weights, the ClusterFit network and the labels it was trained on, all published.
    start = start_weights(cfg, store)
    train_set = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    trained = {
        k: load_labels(cfg.with_num_clusters(k), store, len(train_set), train_set.source)
        for k in cfg.CLUSTERFIT.cluster_counts
    }
    inputs = {"start": start.digest or start.uri}
    for folder in train_folders(cfg):  # train/ (train-k<K>/ per K of a sweep), supervised/
        inputs[folder] = artifacts.read_manifest(store, folder)["_digest"]
    for k, (_, _, digest) in trained.items():
        inputs["labels" if len(trained) == 1 else f"labels-k{k}"] = digest
    fp = fingerprint(cfg, inputs)
    if artifacts.skip_if_published(store, EVAL, fp, "evaluate"):
        metrics = artifacts.load_json(store, EVAL, EVAL_METRICS, artifacts.read_manifest(store, EVAL))
        return EvalResult(EVAL, True, metrics, report.summary_lines(metrics))
    log.info("evaluate: writing to %s", store.uri(EVAL))
    started = time.time()
    # Ground truth of both splits, and the labelled subsets every model's low-shot kNN shares.
    test_set = build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS))
    y_train, y_test = ground_truth(train_set, "TRAIN"), ground_truth(test_set, "TEST")
    shots = cfg.EVALUATE.LOW_SHOT if cfg.EVALUATE.PROTOCOL == "quick" else []  # VISSL's benchmark has no low-shot
    subsets = low_shot_subsets(y_train, shots, cfg.EVALUATE.LOW_SHOT_DRAWS, cfg.EXPERIMENT.SEED)
    # Every model's rows: quick probes on extracted features, or VISSL's benchmark on the frozen trunk.
    rows = []
    for name, model in models(cfg, store, start).items():
        if cfg.EVALUATE.PROTOCOL == "vissl_linear":
            if model is not None:  # raw pixels have no trunk to put VISSL's heads on
                rows += vissl_linear_rows(cfg, name, model, y_train, y_test, dist.device)
            continue
        for layer, (x_train, x_test) in features(cfg, model, train_set, test_set, dist.device).items():
            train, test = (x_train, y_train), (x_test, y_test)
            rows.append(measure(cfg.EVALUATE, cfg.EXPERIMENT.SEED, name, layer, train, test, subsets, dist.device))
            log.info("evaluate %s/%s: %s", name, layer, row_summary(rows[-1]))
    # Paired verdicts, cluster agreement, the spread over other seeds; metrics.json and the report, then
    # _SUCCESS.json.
    first, (trained_on, labels_uri, _) = next(iter(trained.items()))
    metrics = {
        "protocol": cfg.EVALUATE.PROTOCOL,
        "rows": rows,
        "clusters": cluster_agreement(store, cfg.with_num_clusters(first), trained_on, y_train, y_test),
        "cluster_labels": labels_uri,
        "comparison": compare(rows, len(y_test), cfg.EVALUATE.SIGNIFICANCE, cfg.EXPERIMENT.SEED),
        "significance": cfg.EVALUATE.SIGNIFICANCE,
        "n_train": len(y_train),
        "n_test": len(y_test),
        "start_weights": start.uri or "random init",
    }
    if cfg.CLUSTERFIT.is_sweep:  # every K's labels against ground truth
        metrics["sweep"] = [
            {"k": k, **cluster_agreement(store, cfg.with_num_clusters(k), labels, y_train, y_test)}
            for k, (labels, _, _) in trained.items()
        ]
    if cfg.EVALUATE.OTHER_SEEDS:
        others = [json.loads(read_uri(uri, cfg.STORAGE)) for uri in cfg.EVALUATE.OTHER_SEEDS]
        metrics["seed_spread"] = seed_spread([metrics, *others])
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
    if "knn_top1" not in row:
        return f"VISSL linear top-1 {row['linear_top1']:.2f}%"
    low = "".join(f", {n}-shot kNN {v['top1']:.2f}%" for n, v in row["low_shot"].items())
    return f"kNN top-1 {row['knn_top1']:.2f}%{low}, linear top-1 {row['linear_top1']:.2f}%"


def preflight(cfg: Config) -> None:
    """What `clusterfit run` checks before its first step, so evaluate cannot fail on its settings after hours of
    training."""
    y_train = ground_truth(build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS)), "TRAIN")
    ground_truth(build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS)), "TEST")
    if cfg.EVALUATE.PROTOCOL == "quick":
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
    for k in cfg.CLUSTERFIT.cluster_counts:
        name = f"clusterfit-k{k}" if cfg.CLUSTERFIT.is_sweep else "clusterfit"
        out[name] = trained_network(cfg, store, train_folder(cfg.with_num_clusters(k)))
    if "supervised" in cfg.EVALUATE.BASELINES:
        out["supervised"] = trained_network(cfg, store, SUPERVISED)
    return out


def trained_network(cfg: Config, store: Store, folder: str) -> Network:
    """The trunk of a network the train step published in `folder`."""
    network = build_network(cfg.MODEL.TRUNK)
    ours = {"PARAMS_FILE": store.uri(f"{folder}/{FINAL_CHECKPOINT}"), "STATE_DICT_KEY_NAME": "classy_state_dict"}
    options = cfg.MODEL.WEIGHTS_INIT.model_copy(update={**ours, "REMOVE_PREFIX": "", "APPEND_PREFIX": ""})
    load_weights(network, options, cfg.STORAGE)
    return network


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


def vissl_linear_rows(
    cfg: Config, name: str, model: Network, y_train: np.ndarray, y_test: np.ndarray, device: torch.device
) -> list[dict[str, Any]]:
    """One row per EVALUATE.LAYERS entry: VISSL's linear benchmark of `model`'s frozen trunk. TRAIN images get
    VISSL's RandomResizedCrop and flip (DATA.TRANSFORMS without colour jitter: VISSL's benchmark has none)."""
    v = cfg.EVALUATE.VISSL_LINEAR
    augment = train_transform(cfg.DATA.TRANSFORMS.model_copy(update={"COLOR_JITTER": [0.0, 0.0, 0.0, 0.0]}))
    train = LabelledDataset(build_dataset(cfg, "TRAIN", augment), y_train)
    test = LabelledDataset(build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS)), y_test)
    workers = cfg.DATA.NUM_DATALOADER_WORKERS
    generator = torch.Generator().manual_seed(cfg.EXPERIMENT.SEED)
    train_loader = torch.utils.data.DataLoader(
        train, v.BATCH_SIZE, shuffle=True, drop_last=len(train) > v.BATCH_SIZE, num_workers=workers, generator=generator
    )
    test_loader = torch.utils.data.DataLoader(test, cfg.DATA.TEST.BATCHSIZE_PER_REPLICA, num_workers=workers)
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    classes = int(max(y_train.max(), y_test.max())) + 1
    layers = list(cfg.EVALUATE.LAYERS)
    trunk = model.trunk.to(device)
    results = train_linear_eval(trunk, layers, train_loader, test_loader, classes, v, device)
    rows = []
    for layer, (dim, correct) in results.items():
        rows.append(
            {
                "model": name,
                "layer": layer,
                "dim": dim,
                "protocol": "vissl_linear",
                "linear_top1": top1(correct),
                "correct": {"linear_top1": pack_correct(correct)},
            }
        )
        log.info("evaluate %s/%s: %s", name, layer, row_summary(rows[-1]))
    return rows


def cluster_agreement(
    store: Store, cfg: Config, trained_on: np.ndarray, y_train: np.ndarray, y_test: np.ndarray
) -> dict[str, Any]:
    """NMI and ARI against ground truth, per split (images without a label excluded), of the labels training used
    (`trained_on`, from labels.load_labels: DATA.TRAIN.LABEL_PATHS when set, else the experiment's clusters), and
    of the experiment's TEST assignment only when those clusters are what training used."""
    out: dict[str, Any] = {"TRAIN": agreement(y_train, trained_on)}
    if cfg.DATA.TRAIN.LABEL_PATHS:
        return out
    folder = cluster_folder(cfg)
    manifest = artifacts.read_manifest(store, folder)
    name = split_file("TEST", LABELS, cfg.CLUSTERFIT.FEATURES.DATA_PARTITION)
    if name in manifest["files"]:
        out["TEST"] = agreement(y_test, artifacts.load_array(store, folder, name, manifest))
    return out
