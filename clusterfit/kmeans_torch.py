"""k-means in torch: Lloyd iterations as matrix products, on the GPU when there is one.

For where faiss is not installed. Lloyd only, like faiss.Kmeans: CLUSTERFIT.ALGORITHM auto runs
it (recorded as such), superkmeans is refused by the config. Empty clusters are repaired the way faiss does it: an empty
centroid takes a copy of a populous one (chosen with probability proportional to its size), the
two are pushed apart by a small symmetric perturbation, and the points are split between them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from clusterfit.kmeans import Centroids

log = logging.getLogger(__name__)
EPS = 1.0 / 1024.0  # faiss's perturbation for split clusters


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


SCORE_BUDGET_BYTES = 256 * 1024 * 1024  # one (rows x K) float32 score block at a time


def nearest(x: torch.Tensor, centroids: torch.Tensor, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x (n, D), centroids (K, D) -> ids int64 (n,), squared distances (n,), via ||x||² - 2x·c + ||c||²."""
    batch = batch or max(256, SCORE_BUDGET_BYTES // (4 * centroids.shape[0]))
    c_norm = (centroids * centroids).sum(1)
    ids, dists = [], []
    for start in range(0, x.shape[0], batch):
        chunk = x[start : start + batch]
        scores = torch.addmm(c_norm.unsqueeze(0), chunk, centroids.T, beta=1.0, alpha=-2.0)
        best, idx = scores.min(1)
        dists.append((best + (chunk * chunk).sum(1)).clamp_min_(0))
        ids.append(idx)
    return torch.cat(ids), torch.cat(dists)


def pick_populous(host_counts: np.ndarray, n: int, rng: np.random.Generator) -> int:
    """faiss's walk: from cluster 0 on, accept cluster j with probability (size_j - 1) / (n - k).

    One uniform draw per step, as faiss does, but a lap of steps at a time (a step per cluster in
    Python took seconds with thousands of clusters); the generator is then left exactly where the
    one-at-a-time walk would have left it."""
    k = len(host_counts)
    accept = (host_counts - 1.0) / max(n - k, 1)
    while True:  # each lap starts at cluster 0 again
        state = rng.bit_generator.state
        hits = np.flatnonzero(rng.random(k) < accept)
        if hits.size:
            rng.bit_generator.state = state
            rng.random(int(hits[0]) + 1)  # consume exactly the draws the walk made
            return int(hits[0])


def split_empty(centroids: torch.Tensor, counts: torch.Tensor, n: int, rng: np.random.Generator) -> int:
    """faiss's repair of empty clusters, in place; returns how many were split."""
    host_counts = counts.double().cpu().numpy()
    empty = np.flatnonzero(host_counts == 0)
    sign = torch.ones(centroids.shape[1], device=centroids.device, dtype=centroids.dtype)
    sign[1::2] = -1
    for ci in empty:
        cj = pick_populous(host_counts, n, rng)
        centroids[ci] = centroids[cj] * (1 + sign * EPS)
        centroids[cj] = centroids[cj] * (1 - sign * EPS)
        host_counts[ci] = host_counts[cj] // 2
        host_counts[cj] -= host_counts[ci]
    return len(empty)


def train_torch(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    max_points_per_centroid: int,
    init_centroids: np.ndarray | None = None,
) -> Centroids:
    """Lloyd's k-means on float32 (n, D) x (already the training sample)."""
    device = _device()
    rng = np.random.default_rng(seed)
    n = x.shape[0]
    if n > k * max_points_per_centroid:
        x = x[np.sort(rng.choice(n, k * max_points_per_centroid, replace=False))]
        n = x.shape[0]
    points = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    init = init_centroids if init_centroids is not None else x[rng.choice(n, k, replace=False)]
    centroids = torch.from_numpy(np.array(init, dtype=np.float32)).to(device)
    objective: list[float] = []
    iteration_s: list[float] = []
    splits = 0
    start = time.perf_counter()
    for _ in range(niter):
        iteration_start = time.perf_counter()
        ids, dists = nearest(points, centroids)
        objective.append(float(dists.double().sum()))
        sums = torch.zeros_like(centroids).index_add_(0, ids, points)
        counts = torch.bincount(ids, minlength=k).to(points.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1)
        if not bool(filled.all()):
            splits += split_empty(centroids, counts, n, rng)
        iteration_s.append(time.perf_counter() - iteration_start)  # the objective's float() has synchronised
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    log.info(
        "torch k-means on %s: n=%d d=%d k=%d, %d iterations in %.1fs, %d empty clusters split",
        device,
        n,
        x.shape[1],
        k,
        niter,
        elapsed,
        splits,
    )
    return Centroids(
        centroids.cpu().numpy(),
        objective,
        f"torch-lloyd-{device.type}",
        elapsed,
        {"splits": splits, "iteration_s": iteration_s},
    )


class TorchAssigner:
    def __init__(self, centroids: np.ndarray) -> None:
        self.device = _device()
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(self.device)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids, dists = nearest(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device), self.centroids
        )
        return ids.cpu().numpy().astype(np.int64), dists.cpu().numpy().astype(np.float32)
