"""k-means backends, thin over the libraries: faiss (Lloyd or SuperKMeans) and a torch matmul one.

The two have one shape: `train(x, k, ...) -> Centroids` and `Assigner.assign(x) -> (labels, sqdist)`.
The torch backend lives in `kmeans_torch` and is imported only when chosen: the cluster image has
no torch.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

# faiss's SuperKMeans prunes distance computations in a rotated space; it wins at large d and
# loses at small d (measured with faiss-cpu 1.15: 1.43x Lloyd at d=2048, 0.66x at d=256).
SUPERKMEANS_MIN_DIM = 1024


@dataclass
class Centroids:
    """Trained centroids, float32 (K, D), with the objective (sum of squared distances) per iteration."""

    centroids: np.ndarray
    objective: list[float]
    algorithm: str
    train_s: float
    extra: dict[str, Any] = field(default_factory=dict)


class Assigner(Protocol):
    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 (n, D) -> nearest centroid ids int64 (n,) and squared L2 distances float32 (n,)."""
        ...


def l2_normalize(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32 (n, D) in and out.

    `inplace` overwrites a float32 x (no second copy of a large array) and returns it."""
    norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if inplace and x.dtype == np.float32:
        x /= norms
        return x
    return (x / norms).astype(np.float32, copy=False)


def choose_algorithm(requested: str, dim: int, on_gpu: bool) -> str:
    if requested != "auto":
        return requested
    return "superkmeans" if dim >= SUPERKMEANS_MIN_DIM and not on_gpu else "lloyd"


def faiss_gpus() -> int:
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def train_faiss(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    max_points_per_centroid: int,
    algorithm: str = "auto",
    init_centroids: np.ndarray | None = None,
) -> Centroids:
    """faiss k-means on float32 (n, D) x; `x` is already the training sample."""
    import faiss

    n, dim = x.shape
    gpus = faiss_gpus()
    chosen = choose_algorithm(algorithm, dim, gpus > 0)
    if init_centroids is not None:
        chosen = "lloyd"  # SuperKMeans takes no initial centroids
    start = time.perf_counter()
    if chosen == "superkmeans":
        params = faiss.SuperKMeansParameters()
        params.niter, params.seed, params.max_points_per_centroid = niter, seed, max_points_per_centroid
        params.min_points_per_centroid = 1
        km = faiss.SuperKMeans(dim, k, params)
        km.train(np.ascontiguousarray(x, dtype=np.float32))
        centroids = faiss.vector_float_to_array(km.centroids).reshape(k, dim)
        stats = km.iteration_stats
        objective = [float(stats.at(i).obj) for i in range(stats.size())]
        iteration_s = [float(stats.at(i).time) for i in range(stats.size())]
    else:
        km = faiss.Kmeans(
            dim,
            k,
            niter=niter,
            seed=seed,
            max_points_per_centroid=max_points_per_centroid,
            min_points_per_centroid=1,
            gpu=gpus if gpus else False,
        )
        km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init_centroids)
        centroids, objective = km.centroids, [float(v) for v in km.obj]
        iteration_s = np.diff([0.0, *(float(s["time"]) for s in km.iteration_stats)]).tolist()  # faiss's are cumulative
    elapsed = time.perf_counter() - start
    log.info("faiss %s: n=%d d=%d k=%d, %d iterations in %.1fs (gpus=%d)", chosen, n, dim, k, niter, elapsed, gpus)
    extra = {"gpus": gpus, "iteration_s": iteration_s}
    return Centroids(np.ascontiguousarray(centroids, dtype=np.float32), objective, f"faiss-{chosen}", elapsed, extra)


class FaissAssigner:
    """Exact nearest-centroid search with a flat L2 index (on all GPUs when faiss sees any)."""

    def __init__(self, centroids: np.ndarray) -> None:
        import faiss

        index = faiss.IndexFlatL2(centroids.shape[1])
        if faiss_gpus():
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        self.index = index

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        sqdist, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64), sqdist[:, 0].astype(np.float32)


def train(backend: str, x: np.ndarray, k: int, **kwargs: Any) -> Centroids:
    if backend == "torch":
        from clusterfit import kmeans_torch

        kwargs.pop("algorithm", None)
        return kmeans_torch.train_torch(x, k, **kwargs)
    return train_faiss(x, k, **kwargs)


def assigner(backend: str, centroids: np.ndarray) -> Assigner:
    if backend == "torch":
        from clusterfit import kmeans_torch

        return kmeans_torch.TorchAssigner(centroids)
    return FaissAssigner(centroids)
