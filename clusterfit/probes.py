"""How evaluate measures frozen features, and when a difference counts: kNN top-1 (all labels and
low-shot), a linear probe, cluster/label agreement, and the paired
test of a comparison (McNemar on the same test images; a paired bootstrap for low-shot).

Small pure functions over arrays: features are float32 (n, D), labels int64 (n,), accuracies in %,
per-image correctness bool (n_test,) (stored packed in metrics.json: `pack_correct`).
"""

from __future__ import annotations

import base64
import math
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from scipy.stats import binom
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
    """One row of the evaluation: kNN top-1 with all labels and per low-shot count, and linear top-1; with each
    metric's per-image correctness under "correct" (a list over the draws for low-shot)."""
    (x_train, y_train), (x_test, y_test) = train, test
    knn = knn_correct(x_train, y_train, x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device)
    correct: dict[str, Any] = {"knn_top1": pack_correct(knn)}
    low_shot = {}
    for n, sets in subsets.items():
        draws = [knn_correct(x_train[s], y_train[s], x_test, y_test, e.KNN_K, e.KNN_TEMPERATURE, device) for s in sets]
        per_draw = [top1(d) for d in draws]
        low_shot[str(n)] = {"top1": float(np.mean(per_draw)), "std": float(np.std(per_draw)), "per_draw": per_draw}
        correct[f"knn_{n}shot_top1"] = [pack_correct(d) for d in draws]
    torch.manual_seed(seed)
    linear = linear_probe_correct(train, test, e.LINEAR_EPOCHS, e.LINEAR_LR, e.LINEAR_WEIGHT_DECAY, device)
    correct["linear_top1"] = pack_correct(linear)
    dim = int(x_train.shape[1])
    return {
        "model": model,
        "layer": layer,
        "dim": dim,
        "knn_top1": top1(knn),
        "low_shot": low_shot,
        "linear_top1": top1(linear),
        "correct": correct,
    }


def top1(correct: np.ndarray) -> float:
    """Top-1 (%) from per-image correctness."""
    return 100.0 * float(np.mean(correct))


def pack_correct(correct: np.ndarray) -> str:
    """bool (n,) -> base64 of its bits: 50,000 test images take 8 kB of metrics.json."""
    return base64.b64encode(np.packbits(np.asarray(correct, dtype=bool)).tobytes()).decode()


def unpack_correct(packed: str, n: int) -> np.ndarray:
    """The inverse of pack_correct: bool (n,)."""
    return np.unpackbits(np.frombuffer(base64.b64decode(packed), dtype=np.uint8), count=n).astype(bool)


def knn_correct(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    k: int,
    temperature: float,
    device: torch.device = CPU,
) -> np.ndarray:
    """bool (n_test,): is each test image's class the cosine kNN's, with exp(sim / T)-weighted votes (Wu et al.
    2018, as in DINO); queries in blocks of 1024."""
    bank = F.normalize(torch.from_numpy(x_train).float().to(device), dim=1)
    queries = F.normalize(torch.from_numpy(x_test).float().to(device), dim=1)
    labels = torch.from_numpy(y_train).to(device)
    classes = int(max(y_train.max(), y_test.max())) + 1
    k = min(k, len(bank))
    predicted = []
    for start in range(0, len(queries), 1024):
        sims, idx = (queries[start : start + 1024] @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(len(idx), classes, device=device).scatter_add_(1, labels[idx], weights)
        predicted.append(votes.argmax(1).cpu().numpy())
    return np.concatenate(predicted) == y_test


def linear_probe_correct(
    train: Split, test: Split, epochs: int, lr: float, weight_decay: float, device: torch.device = CPU
) -> np.ndarray:
    """bool (n_test,): a linear classifier's (SGD, cosine LR, batches of 256) correctness on standardised frozen
    features."""
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
        return np.asarray(head(xte).argmax(1).cpu().numpy() == y_test)


def agreement(truth: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """NMI and ARI of cluster labels against ground truth; images without a label (-1) left out."""
    keep = labels >= 0
    return {
        "nmi": float(normalized_mutual_info_score(truth[keep], labels[keep])),
        "ari": float(adjusted_rand_score(truth[keep], labels[keep])),
    }


# ---------------------------------------------------------------------------------------------
# When a difference counts: paired tests on the same test images, and the spread over seeds.


def mcnemar(ours: np.ndarray, theirs: np.ndarray) -> dict[str, Any]:
    """McNemar's test on paired per-image correctness (bool (n,) each): b images only ours gets right, c only
    theirs; under "no difference" b ~ Binomial(b + c, 1/2). Two-sided exact p and mid-p (the exact p less the
    probability of the observed split, which keeps the level closer to nominal; Fagerland et al. 2013)."""
    b = int(np.sum(ours & ~theirs))
    c = int(np.sum(~ours & theirs))
    n, low = b + c, min(b, c)
    if n == 0:
        return {"b": 0, "c": 0, "exact_p": 1.0, "p_value": 1.0}
    tail, point = float(binom.cdf(low, n, 0.5)), float(binom.pmf(low, n, 0.5))
    exact, mid = min(1.0, 2.0 * tail), min(1.0, 2.0 * tail - point)
    return {"b": b, "c": c, "exact_p": exact, "p_value": mid}


def paired_bootstrap(ours: np.ndarray, theirs: np.ndarray, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Paired bootstrap of the top-1 difference (points) for bool (draws, n) correctness of both models on the
    same draws and test images: each resample draws draws and images with replacement. Two-sided p: twice the
    share of resampled differences on the far side of zero."""
    diff = ours.astype(np.float32) - theirs.astype(np.float32)
    rng = np.random.default_rng(seed)
    draws, n = diff.shape
    deltas = np.empty(resamples)
    for i in range(resamples):
        rows = diff[rng.integers(0, draws, draws)]
        deltas[i] = 100.0 * rows[:, rng.integers(0, n, n)].mean()
    p_value = min(1.0, 2.0 * min(float(np.mean(deltas <= 0)), float(np.mean(deltas >= 0))))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return {"p_value": p_value, "interval_95": [float(low), float(high)], "resamples": resamples}


def metric_values(row: dict[str, Any]) -> dict[str, tuple[int | None, float]]:
    """metric name -> (labelled images per class or None for all, top-1 %), for the metrics the row has."""
    out: dict[str, tuple[int | None, float]] = {}
    if "knn_top1" in row:
        out["knn_top1"] = (None, row["knn_top1"])
    out |= {f"knn_{n}shot_top1": (int(n), v["top1"]) for n, v in row.get("low_shot", {}).items()}
    return out | {"linear_top1": (None, row["linear_top1"])}


def correctness(row: dict[str, Any], metric: str, n_test: int) -> np.ndarray:
    """bool (draws, n_test) of a row's metric (one draw for full-data metrics)."""
    packed = row["correct"][metric]
    return np.stack([unpack_correct(p, n_test) for p in (packed if isinstance(packed, list) else [packed])])


def paired_test(ours: np.ndarray, theirs: np.ndarray, seed: int) -> dict[str, Any]:
    """McNemar mid-p for one correctness vector per model, else a paired bootstrap over images and draws."""
    if len(ours) == 1:
        return {"test": "McNemar mid-p", **mcnemar(ours[0], theirs[0])}
    return {"test": "paired bootstrap", **paired_bootstrap(ours, theirs, seed=seed)}


def is_clusterfit(model: str) -> bool:
    """A ClusterFit row: `clusterfit`, or `clusterfit-k<K>` per K of a sweep."""
    return model == "clusterfit" or model.startswith("clusterfit-k")


def pairs(rows: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, Any], str]]:
    """(layer, a ClusterFit row, its reference's row, the reference's name) per ClusterFit network and layer both
    have; the reference is the starting model, else the random trunk."""
    by_key = {(r["model"], r["layer"]): r for r in rows}
    reference = "start" if any(r["model"] == "start" for r in rows) else "random"
    return [
        (layer, row, by_key[(reference, layer)], reference)
        for (model, layer), row in by_key.items()
        if is_clusterfit(model) and (reference, layer) in by_key
    ]


def compare(rows: list[dict[str, Any]], n_test: int, alpha: float = 0.05, seed: int = 0) -> list[dict[str, Any]]:
    """ClusterFit vs. its reference (`pairs`) per network, layer and metric, with a verdict from a paired test on
    the same test images: better or worse when p < alpha, else within noise. With a supervised row, `gap_closed`
    is the share of the reference-to-supervised gap that ClusterFit closes."""
    supervised = {r["layer"]: metric_values(r) for r in rows if r["model"] == "supervised"}
    out = []
    for layer, row, base, reference in pairs(rows):
        theirs = metric_values(base)
        for metric, (shots, value) in metric_values(row).items():
            ref_value = theirs[metric][1]
            test = paired_test(correctness(row, metric, n_test), correctness(base, metric, n_test), seed)
            delta = value - ref_value
            real = test["p_value"] < alpha
            verdict = "better" if real and delta > 0 else "worse" if real and delta < 0 else "within noise"
            entry = {
                "model": row["model"],
                "layer": layer,
                "metric": metric,
                "shots": shots,
                "reference": reference,
                "reference_value": ref_value,
                "clusterfit": value,
                "delta": delta,
                **test,
                "verdict": verdict,
            }
            if layer in supervised and metric in supervised[layer]:
                entry["supervised"] = upper = supervised[layer][metric][1]
                entry["gap_closed"] = delta / (upper - ref_value) if upper > ref_value else None
            out.append(entry)
    return out


def seed_spread(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation (ddof=1) over training seeds, per ClusterFit network, layer and metric, of
    ClusterFit's top-1, its reference's and their difference; `runs` are metrics.json dicts of the same experiment
    with other seeds."""
    values: dict[tuple[str, str, str, int | None], list[tuple[float, float]]] = {}
    for metrics in runs:
        for layer, row, base, _ in pairs(metrics["rows"]):
            theirs = metric_values(base)
            for metric, (shots, value) in metric_values(row).items():
                values.setdefault((row["model"], layer, metric, shots), []).append((value, theirs[metric][1]))
    out = []
    for (model, layer, metric, shots), found in values.items():
        ours, theirs_ = np.array(found).T
        out.append(
            {
                "model": model,
                "layer": layer,
                "metric": metric,
                "shots": shots,
                "seeds": len(found),
                "clusterfit_mean": float(ours.mean()),
                "clusterfit_std": sample_std(ours),
                "reference_mean": float(theirs_.mean()),
                "delta_mean": float((ours - theirs_).mean()),
                "delta_std": sample_std(ours - theirs_),
            }
        )
    return out


def combine_seeds(runs: list[dict[str, Any]], alpha: float = 0.05) -> list[dict[str, Any]]:
    """One verdict per ClusterFit network, layer and metric over several training seeds (`runs`: each seed's
    metrics.json). Each seed's paired test (same test images) gives a two-sided p and the sign of its difference;
    Stouffer's method combines them (z_i = sign x Phi^-1(1 - p_i / 2), Z = sum z_i / sqrt(n)). Better or worse
    needs the combined p < alpha and the same sign in every seed, so that one lucky seed cannot carry it;
    otherwise within noise. Means and sample standard deviations (ddof=1) over seeds come with it."""
    normal = NormalDist()
    found: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for metrics in runs:
        for c in metrics["comparison"]:
            found.setdefault((c.get("model", "clusterfit"), c["layer"], c["metric"]), []).append(c)
    out = []
    for (model, layer, metric), per_seed in found.items():
        deltas = np.array([c["delta"] for c in per_seed])
        z = [math.copysign(normal.inv_cdf(1 - p_floor(c) / 2), c["delta"]) for c in per_seed]
        combined = sum(z) / math.sqrt(len(z))
        p_value = 2 * (1 - normal.cdf(abs(combined)))
        agree = bool((deltas > 0).all() or (deltas < 0).all())
        real = p_value < alpha and agree
        verdict = "better" if real and combined > 0 else "worse" if real and combined < 0 else "within noise"
        ours = np.array([c["clusterfit"] for c in per_seed])
        theirs = np.array([c["reference_value"] for c in per_seed])
        entry = {
            "model": model,
            "layer": layer,
            "metric": metric,
            "shots": per_seed[0]["shots"],
            "reference": per_seed[0]["reference"],
            "seeds": len(per_seed),
            "clusterfit_mean": float(ours.mean()),
            "clusterfit_std": sample_std(ours),
            "reference_mean": float(theirs.mean()),
            "reference_std": sample_std(theirs),
            "delta_mean": float(deltas.mean()),
            "delta_std": sample_std(deltas),
            "deltas": deltas.tolist(),
            "p_values": [c["p_value"] for c in per_seed],
            "test": "Stouffer over seeds of " + per_seed[0]["test"],
            "p_value": p_value,
            "same_sign": agree,
            "verdict": verdict,
        }
        if all("supervised" in c for c in per_seed):
            upper = np.array([c["supervised"] for c in per_seed])
            entry["supervised_mean"], entry["supervised_std"] = float(upper.mean()), sample_std(upper)
            span = entry["supervised_mean"] - entry["reference_mean"]
            entry["gap_closed"] = entry["delta_mean"] / span if span > 0 else None  # no gap: nothing to close
        out.append(entry)
    return out


def p_floor(comparison: dict[str, Any]) -> float:
    """A comparison's p-value, at least the smallest its test can resolve: 1 / resamples for a bootstrap (whose p
    is 0 when no resample crosses zero), 1e-12 for McNemar's exact mid-p."""
    return max(comparison["p_value"], 1.0 / comparison.get("resamples", 1e12))


def mean_rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (model, layer) row over the seeds' metrics.json, in row order and in a row's own format (kNN, low-shot
    and linear top-1 as the mean over seeds) with `std`: each metric's sample std over seeds."""
    found: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for metrics in runs:
        for row in metrics["rows"]:
            found.setdefault((row["model"], row["layer"]), []).append(row)
    out = []
    for (model, layer), rows in found.items():
        values = [metric_values(r) for r in rows]
        stats = {m: np.array([v[m][1] for v in values]) for m in values[0]}
        mean = {"model": model, "layer": layer, "dim": rows[0]["dim"], "seeds": len(rows)}
        if "knn_top1" in stats:
            mean["knn_top1"] = float(stats["knn_top1"].mean())
        shots = [n for n in rows[0].get("low_shot", {})]
        if shots:
            mean["low_shot"] = {
                n: {"top1": float(stats[f"knn_{n}shot_top1"].mean()), "std": sample_std(stats[f"knn_{n}shot_top1"])}
                for n in shots
            }
        mean["linear_top1"] = float(stats["linear_top1"].mean())
        mean["std"] = {m: sample_std(v) for m, v in stats.items()}
        out.append(mean)
    return out


def sample_std(values: np.ndarray) -> float:
    """Standard deviation with ddof=1; 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
