"""Step 3: does ClusterFit beat the features it started from? One protocol for every model.

    clusterfit evaluate config=quickstart

For each model (the starting model, the ClusterFit model, and the baselines: a randomly
initialised trunk and raw pixels) and each layer in EVALUATE.LAYERS: kNN top-1 (cosine,
temperature-weighted votes, k=KNN_K) and a linear probe's top-1 on frozen features, trained on
TRAIN and measured on TEST; with EVALUATE.LOW_SHOT, kNN top-1 again with only n labelled TRAIN
images per class (the mean over LOW_SHOT_DRAWS random subsets, the same subsets for every model),
where a representation's quality shows long before full-data kNN saturates. NMI and ARI of the
cluster labels against ground truth. A difference is called real only when it exceeds twice its
standard error: the TEST set's binomial error, plus the spread over the draws for low-shot.
Writes `eval/metrics.json` and the run report (`eval/report.html`, `eval/report.md`, PNGs).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn
from torch.nn import functional as F

from clusterfit import artifacts, distributed, report
from clusterfit.config import Config, ConfigError
from clusterfit.data import ImageDataset, build_dataset, dataset_identity, eval_transform
from clusterfit.extract import forward_features, memory_format, starting_model
from clusterfit.layout import EVAL, TRAIN, cluster_folder, start_weights
from clusterfit.models import Network, build_network
from clusterfit.storage import Store, open_store
from clusterfit.weights import load_weights

log = logging.getLogger(__name__)
CPU = torch.device("cpu")


@dataclass
class EvalResult:
    folder: str
    skipped: bool
    metrics: dict[str, Any] | None = field(default=None, repr=False)  # in eval/metrics.json; too long for a log line


def run(cfg: Config) -> EvalResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    if not dist.is_main:  # evaluation is small next to training: rank 0 does it
        return EvalResult(EVAL, True)
    start = start_weights(cfg, store)
    train_manifest = artifacts.read_manifest(store, TRAIN)
    cluster_manifest = artifacts.read_manifest(store, cluster_folder(cfg))
    inputs = {"start": start.digest or start.uri, "train": train_manifest["_digest"], "cluster": cluster_manifest["_digest"]}
    fp = artifacts.fingerprint("evaluate", {"EVALUATE": cfg.EVALUATE.model_dump(mode="json"), "test": dataset_identity(cfg, "TEST"),
                                            "train": dataset_identity(cfg, "TRAIN"), "seed": cfg.EXPERIMENT.SEED}, inputs)  # fmt: skip
    if artifacts.is_published(store, EVAL, fp):
        log.info("evaluate: already published at %s with the same config and inputs; skipping", store.uri(EVAL))
        return EvalResult(EVAL, True)
    log.info("evaluate: writing to %s", store.uri(EVAL))
    started = time.time()
    train_set = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    test_set = build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS))
    y_train, y_test = ground_truth(train_set, "TRAIN"), ground_truth(test_set, "TEST")
    subsets = low_shot_subsets(y_train, cfg.EVALUATE.LOW_SHOT, cfg.EVALUATE.LOW_SHOT_DRAWS, cfg.EXPERIMENT.SEED)
    # Features of every model on both splits, then the probes.
    rows = []
    for name, model in models(cfg, store, start).items():
        for layer, (x_train, x_test) in features(cfg, model, train_set, test_set, dist.device).items():
            rows.append(probe(cfg, name, layer, (x_train, y_train), (x_test, y_test), subsets, dist.device))
            low = "".join(f", {n}-shot kNN {v['top1']:.2f}%" for n, v in rows[-1]["low_shot"].items())
            log.info("evaluate %s/%s: kNN top-1 %.2f%%%s, linear top-1 %.2f%%", name, layer, rows[-1]["knn_top1"], low, rows[-1]["linear_top1"])
    metrics = {
        "rows": rows,
        "clusters": cluster_agreement(store, cfg, cluster_manifest, y_train, y_test),
        "comparison": compare(rows, len(y_test)),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "start_weights": start.uri or "random init",
    }
    ledger = artifacts.Ledger(store, EVAL)
    ledger.put_json("metrics.json", metrics)
    report.write(cfg, store, ledger, metrics, test_set)
    artifacts.publish(ledger, step="evaluate", config=cfg.model_dump(mode="json"), inputs=inputs, fingerprint_=fp, started_s=started)
    log.info("evaluate: report at %s", store.uri(f"{EVAL}/report.html"))
    return EvalResult(EVAL, False, metrics)


def preflight(cfg: Config) -> None:
    """What `clusterfit run` checks before its first step, so evaluate cannot fail on its settings after hours of training."""
    y_train = ground_truth(build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS)), "TRAIN")
    ground_truth(build_dataset(cfg, "TEST", eval_transform(cfg.DATA.TRANSFORMS)), "TEST")
    check_low_shot(y_train, cfg.EVALUATE.LOW_SHOT)


def ground_truth(dataset: ImageDataset, partition: str) -> np.ndarray:
    if dataset.source.targets is None:
        raise ConfigError(f"DATA.{partition}: the evaluate step needs ground-truth labels, and this dataset has none "
                          "(drop evaluate from PIPELINE.STEPS)")  # fmt: skip
    return np.asarray(dataset.source.targets, dtype=np.int64)


def models(cfg: Config, store: Store, start: Any) -> dict[str, Network | None]:
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
    options = cfg.MODEL.WEIGHTS_INIT.model_copy(update={"PARAMS_FILE": store.uri(f"{TRAIN}/final.pt"), "STATE_DICT_KEY_NAME": "classy_state_dict",
                                                         "REMOVE_PREFIX": "", "APPEND_PREFIX": ""})  # fmt: skip
    load_weights(clusterfit, options, cfg.STORAGE)
    out["clusterfit"] = clusterfit
    return out


def features(cfg: Config, model: Network | None, train_set: ImageDataset, test_set: ImageDataset, device: torch.device) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{layer: (train features, test features)}; raw pixels when model is None."""
    layers: list[str] = ["pixels"] if model is None else list(cfg.EVALUATE.LAYERS)
    if model is not None:
        model.to(device).to(memory_format=memory_format(cfg)).eval()
    both = [in_memory(cfg, model, dataset, layers, device) for dataset in (train_set, test_set)]
    return {layer: (both[0][layer], both[1][layer]) for layer in layers}


def in_memory(cfg: Config, model: Network | None, dataset: ImageDataset, layers: list[str], device: torch.device) -> dict[str, np.ndarray]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.DATA.TEST.BATCHSIZE_PER_REPLICA, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS)
    parts: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    for images, _, _ in loader:
        if model is None:
            parts["pixels"].append(pixel_features(images, cfg.EVALUATE.PIXELS_SIZE))
            continue
        for layer, array in forward_features(model, images.to(device), layers, cfg.EXTRACT.POOL_SIZE, memory_format(cfg)).items():
            parts[layer].append(array)
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}


def pixel_features(images: torch.Tensor, size: int) -> np.ndarray:
    """(B, C, H, W) -> float32 (B, C * h * w), h, w <= size: the raw-pixel baseline, average-pooled so
    that it stays small at any image size (3 x 224 x 224 pixels would be 150,528 dims per image)."""
    height, width = images.shape[-2:]
    if max(height, width) > size:
        images = F.adaptive_avg_pool2d(images, (min(size, height), min(size, width)))
    return images.flatten(1).float().numpy()


def check_low_shot(y_train: np.ndarray, shots: list[int]) -> None:
    """A ConfigError naming the first class with fewer TRAIN images than a LOW_SHOT entry asks for."""
    classes, counts = np.unique(y_train, return_counts=True)
    for n in shots:
        if (short := np.flatnonzero(counts < n)).size:
            raise ConfigError(f"EVALUATE.LOW_SHOT: {n} labelled images per class asked for, but class {classes[short[0]]} has "
                              f"{counts[short[0]]} in DATA.TRAIN ({short.size} classes have fewer than {n})")  # fmt: skip


def low_shot_subsets(y_train: np.ndarray, shots: list[int], draws: int, seed: int) -> dict[int, list[np.ndarray]]:
    """{n: `draws` sorted index sets holding n TRAIN images of every class}; fails before any work if a class is short."""
    check_low_shot(y_train, shots)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y_train == c) for c in np.unique(y_train)]
    return {n: [np.sort(np.concatenate([rng.choice(m, n, replace=False) for m in members])) for _ in range(draws)] for n in shots}


def probe(cfg: Config, model: str, layer: str, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray],
          subsets: dict[int, list[np.ndarray]], device: torch.device) -> dict[str, Any]:  # fmt: skip
    e = cfg.EVALUATE
    (x_train, y_train), (x_test, y_test) = train, test
    knn = knn_top1(x_train, y_train, x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device)
    low_shot = {}
    for n, sets in subsets.items():
        per_draw = [knn_top1(x_train[s], y_train[s], x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device) for s in sets]
        low_shot[str(n)] = {"top1": float(np.mean(per_draw)), "std": float(np.std(per_draw)), "per_draw": per_draw}
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    linear = linear_probe_top1(x_train, y_train, x_test, y_test, e.LINEAR_EPOCHS, e.LINEAR_LR, e.LINEAR_WEIGHT_DECAY, device)
    return {"model": model, "layer": layer, "dim": int(x_train.shape[1]), "knn_top1": knn, "low_shot": low_shot, "linear_top1": linear}


def knn_top1(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, k: int, temperature: float,
             device: torch.device = CPU) -> float:  # fmt: skip
    """Top-1 (%) of a cosine kNN with exp(sim / T)-weighted votes (Wu et al. 2018, as in DINO); queries in blocks of 1024."""
    bank = F.normalize(torch.from_numpy(x_train).float().to(device), dim=1)
    queries = F.normalize(torch.from_numpy(x_test).float().to(device), dim=1)
    labels = torch.from_numpy(y_train).to(device)
    classes = int(max(y_train.max(), y_test.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), 1024):
        sims, idx = (queries[start : start + 1024] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1).cpu().numpy() == y_test[start : start + 1024]).sum())
    return 100.0 * correct / len(y_test)


def linear_probe_top1(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, epochs: int, lr: float, wd: float,
                      device: torch.device = CPU) -> float:  # fmt: skip
    """Top-1 (%) of a linear classifier (SGD, cosine LR) on standardised frozen features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.from_numpy((x_train - mean) / std).float().to(device)
    xte = torch.from_numpy((x_test - mean) / std).float().to(device)
    ytr = torch.from_numpy(y_train).to(device)
    head = nn.Linear(xtr.shape[1], int(max(y_train.max(), y_test.max())) + 1).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    steps_per_epoch = math.ceil(len(xtr) / 256)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    for _ in range(epochs):
        order = torch.randperm(len(xtr))
        for start in range(0, len(xtr), 256):
            batch = order[start : start + 256].to(device)
            loss = F.cross_entropy(head(xtr[batch]), ytr[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        return 100.0 * float((head(xte).argmax(1).cpu().numpy() == y_test).mean())


def cluster_agreement(store: Store, cfg: Config, manifest: dict[str, Any], y_train: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    """NMI and ARI of the cluster labels against ground truth, per split (images without a label excluded)."""
    folder = cluster_folder(cfg)
    out: dict[str, Any] = {}
    for split, name, truth in (("TRAIN", "labels.npy", y_train), ("TEST", "test/labels.npy", y_test)):
        if name not in manifest["files"]:
            continue
        labels = artifacts.load_array(store, folder, name, manifest)
        keep = labels >= 0
        out[split] = {"nmi": float(normalized_mutual_info_score(truth[keep], labels[keep])),
                      "ari": float(adjusted_rand_score(truth[keep], labels[keep]))}  # fmt: skip
    return out


def metric_values(row: dict[str, Any]) -> dict[str, tuple[int | None, float, list[float]]]:
    """metric name -> (labelled images per class or None for all, top-1 %, per-draw values; [] when there is one value)."""
    out: dict[str, tuple[int | None, float, list[float]]] = {"knn_top1": (None, row["knn_top1"], [])}
    out |= {f"knn_{n}shot_top1": (int(n), v["top1"], v["per_draw"]) for n, v in row.get("low_shot", {}).items()}
    return out | {"linear_top1": (None, row["linear_top1"], [])}


def compare(rows: list[dict[str, Any]], n_test: int) -> list[dict[str, Any]]:
    """ClusterFit vs. the starting model per layer and metric, with a 2-standard-error noise band.

    The error of a difference: the binomial error of both top-1s on n_test images, and for low-shot
    metrics also the standard error of the mean of the paired per-draw differences (same subsets).
    """
    by_key = {(r["model"], r["layer"]): r for r in rows}
    reference = "start" if any(r["model"] == "start" for r in rows) else "random"
    out = []
    for (model, layer), row in by_key.items():
        base = by_key.get((reference, layer))
        if model != "clusterfit" or base is None:
            continue
        ours, theirs = metric_values(row), metric_values(base)
        for metric, (shots, value, draws) in ours.items():
            _, ref_value, ref_draws = theirs[metric]
            p1, p2 = ref_value / 100.0, value / 100.0
            variance = (p1 * (1 - p1) + p2 * (1 - p2)) / max(n_test, 1) * 1e4
            if len(draws) > 1:
                variance += float(np.var(np.subtract(draws, ref_draws), ddof=1)) / len(draws)
            noise = 2.0 * math.sqrt(variance)
            delta = value - ref_value
            verdict = "better" if delta > noise else "worse" if delta < -noise else "within noise"
            out.append({"layer": layer, "metric": metric, "shots": shots, "reference": reference, "reference_value": ref_value,
                        "clusterfit": value, "delta": delta, "noise_2se": noise, "verdict": verdict})  # fmt: skip
    return out
