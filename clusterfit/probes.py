"""How evaluate measures frozen features, and when a difference counts: kNN top-1 (all labels and
low-shot), a linear probe, cluster/label agreement, and the noise band of a comparison.

Small pure functions over arrays: features are float32 (n, D), labels int64 (n,), accuracies in %.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from torch import nn
from torch.nn import functional as F

from clusterfit.config import ConfigError
from clusterfit.config.schema import EvaluateConfig

CPU = torch.device("cpu")
Split = tuple[np.ndarray, np.ndarray]  # (features float32 (n, D), labels int64 (n,))


def check_low_shot(y_train: np.ndarray, shots: list[int]) -> None:
    """A ConfigError naming the first class with fewer TRAIN images than a LOW_SHOT entry asks for."""
    classes, counts = np.unique(y_train, return_counts=True)
    for n in shots:
        if (short := np.flatnonzero(counts < n)).size:
            first = short[0]
            raise ConfigError(
                f"EVALUATE.LOW_SHOT: {n} labelled images per class asked for, but class {classes[first]} has "
                f"{counts[first]} in DATA.TRAIN ({short.size} classes have fewer than {n})"
            )


def low_shot_subsets(y_train: np.ndarray, shots: list[int], draws: int, seed: int) -> dict[int, list[np.ndarray]]:
    """{n: `draws` sorted index sets holding n TRAIN images of every class}; fails before any work if a class is
    short."""
    check_low_shot(y_train, shots)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y_train == c) for c in np.unique(y_train)]

    def draw(n: int) -> np.ndarray:
        return np.sort(np.concatenate([rng.choice(m, n, replace=False) for m in members]))

    return {n: [draw(n) for _ in range(draws)] for n in shots}


def measure(
    e: EvaluateConfig,
    seed: int,
    model: str,
    layer: str,
    train: Split,
    test: Split,
    subsets: dict[int, list[np.ndarray]],
    device: torch.device,
) -> dict[str, Any]:
    """One row of the evaluation: kNN top-1 with all labels and per low-shot count, and linear top-1."""
    (x_train, y_train), (x_test, y_test) = train, test
    knn = knn_top1(x_train, y_train, x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device)
    low_shot = {}
    for n, sets in subsets.items():
        per_draw = [knn_top1(x_train[s], y_train[s], x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device) for s in sets]
        low_shot[str(n)] = {"top1": float(np.mean(per_draw)), "std": float(np.std(per_draw)), "per_draw": per_draw}
    torch.manual_seed(seed)
    linear = linear_probe_top1(train, test, e.LINEAR_EPOCHS, e.LINEAR_LR, e.LINEAR_WEIGHT_DECAY, device)
    dim = int(x_train.shape[1])
    return {"model": model, "layer": layer, "dim": dim, "knn_top1": knn, "low_shot": low_shot, "linear_top1": linear}


def knn_top1(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    k: int,
    temperature: float,
    device: torch.device = CPU,
) -> float:
    """Top-1 (%) of a cosine kNN with exp(sim / T)-weighted votes (Wu et al. 2018, as in DINO); queries in blocks
    of 1024."""
    bank = F.normalize(torch.from_numpy(x_train).float().to(device), dim=1)
    queries = F.normalize(torch.from_numpy(x_test).float().to(device), dim=1)
    labels = torch.from_numpy(y_train).to(device)
    classes = int(max(y_train.max(), y_test.max())) + 1
    k = min(k, len(bank))
    correct = 0
    for start in range(0, len(queries), 1024):
        sims, idx = (queries[start : start + 1024] @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, labels[idx], weights)
        correct += int((votes.argmax(1).cpu().numpy() == y_test[start : start + 1024]).sum())
    return 100.0 * correct / len(y_test)


def linear_probe_top1(
    train: Split, test: Split, epochs: int, lr: float, weight_decay: float, device: torch.device = CPU
) -> float:
    """Top-1 (%) of a linear classifier (SGD, cosine LR, batches of 256) on standardised frozen features."""
    (x_train, y_train), (x_test, y_test) = train, test
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xtr = torch.from_numpy((x_train - mean) / std).float().to(device)
    xte = torch.from_numpy((x_test - mean) / std).float().to(device)
    ytr = torch.from_numpy(y_train).to(device)
    head = nn.Linear(xtr.shape[1], int(max(y_train.max(), y_test.max())) + 1).to(device)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
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


def agreement(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NMI and ARI of cluster labels against ground truth; images without a label (-1) left out."""
    keep = labels >= 0
    return {
        "nmi": float(normalized_mutual_info_score(truth[keep], labels[keep])),
        "ari": float(adjusted_rand_score(truth[keep], labels[keep])),
    }


def metric_values(row: dict[str, Any]) -> dict[str, tuple[int | None, float, list[float]]]:
    """metric name -> (labelled images per class or None for all, top-1 %, per-draw values; [] when there is one
    value)."""
    out: dict[str, tuple[int | None, float, list[float]]] = {"knn_top1": (None, row["knn_top1"], [])}
    out |= {f"knn_{n}shot_top1": (int(n), v["top1"], v["per_draw"]) for n, v in row.get("low_shot", {}).items()}
    return out | {"linear_top1": (None, row["linear_top1"], [])}


def noise_band(value: float, reference: float, draws: list[float], ref_draws: list[float], n_test: int) -> float:
    """Twice the standard error of `value - reference` (in points): the binomial error of both top-1s on
    n_test images, plus, with paired per-draw values, the standard error of their mean difference."""
    p1, p2 = reference / 100.0, value / 100.0
    variance = (p1 * (1 - p1) + p2 * (1 - p2)) / max(n_test, 1) * 1e4
    if len(draws) > 1:
        variance += float(np.var(np.subtract(draws, ref_draws), ddof=1)) / len(draws)
    return 2.0 * math.sqrt(variance)


def compare(rows: list[dict[str, Any]], n_test: int) -> list[dict[str, Any]]:
    """ClusterFit vs. the starting model (else the random trunk) per layer and metric, with a verdict:
    better or worse only beyond the noise band, else within noise."""
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
            noise = noise_band(value, ref_value, draws, ref_draws, n_test)
            delta = value - ref_value
            verdict = "better" if delta > noise else "worse" if delta < -noise else "within noise"
            out.append(
                {
                    "layer": layer,
                    "metric": metric,
                    "shots": shots,
                    "reference": reference,
                    "reference_value": ref_value,
                    "clusterfit": value,
                    "delta": delta,
                    "noise_2se": noise,
                    "verdict": verdict,
                }
            )
    return out
