"""The k-means backends against each other and against scikit-learn, from the same start."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans

from clusterfit import kmeans, kmeans_torch


def blobs(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (k, d))
    return (centers[rng.integers(0, k, n)] + rng.normal(0, 0.6, (n, d))).astype(np.float32)


def objective(x: np.ndarray, centroids: np.ndarray) -> float:
    """Sum of squared distances to the nearest centroid: an oracle independent of every backend."""
    sq = (
        (x**2).sum(1)[:, None]
        - 2 * x.astype(np.float64) @ centroids.T.astype(np.float64)
        + (centroids.astype(np.float64) ** 2).sum(1)[None]
    )
    return float(np.maximum(sq.min(1), 0).sum())


def test_faiss_torch_and_sklearn_reach_the_same_objective() -> None:
    x, k, niter = blobs(6000, 32, 60), 60, 20
    init = x[np.random.default_rng(1).choice(len(x), k, replace=False)]
    faiss_c = kmeans.train_faiss(
        x, k, niter=niter, seed=1, max_points_per_centroid=256, algorithm="lloyd", init_centroids=init.copy()
    ).centroids
    torch_c = kmeans_torch.train_torch(
        x, k, niter=niter, seed=1, max_points_per_centroid=256, init_centroids=init.copy()
    ).centroids
    sk_c = KMeans(k, init=init.copy(), n_init=1, max_iter=niter, algorithm="lloyd", tol=0).fit(x).cluster_centers_
    objs = {name: objective(x, c) for name, c in (("faiss", faiss_c), ("torch", torch_c), ("sklearn", sk_c))}
    low = min(objs.values())
    assert all(v <= low * 1.01 for v in objs.values()), objs


def test_superkmeans_matches_lloyd_objective_at_high_dim() -> None:
    x, k = blobs(8000, 1024, 30, seed=2), 30
    lloyd = kmeans.train_faiss(x, k, niter=10, seed=1, max_points_per_centroid=256, algorithm="lloyd")
    superk = kmeans.train_faiss(x, k, niter=10, seed=1, max_points_per_centroid=256, algorithm="superkmeans")
    assert superk.algorithm == "faiss-superkmeans"
    assert objective(x, superk.centroids) <= objective(x, lloyd.centroids) * 1.01


def test_auto_chooses_by_shape() -> None:
    assert kmeans.choose_algorithm("auto", 2048, on_gpu=False) == "superkmeans"
    assert kmeans.choose_algorithm("auto", 256, on_gpu=False) == "lloyd"
    assert kmeans.choose_algorithm("auto", 2048, on_gpu=True) == "lloyd"


def test_torch_backend_repairs_empty_clusters_like_faiss() -> None:
    x, k = blobs(3000, 16, 40, seed=3), 40
    init = np.repeat(x[:4], 10, axis=0)  # 36 duplicated centroids: a plain Lloyd loop leaves them empty
    result = kmeans_torch.train_torch(x, k, niter=15, seed=0, max_points_per_centroid=256, init_centroids=init)
    labels, _ = kmeans_torch.TorchAssigner(result.centroids).assign(x)
    assert result.extra["splits"] > 0
    assert (np.bincount(labels, minlength=k) == 0).sum() == 0


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_assignment_is_the_exact_argmin(backend: str) -> None:
    x, centroids = blobs(2000, 24, 10, seed=4), blobs(50, 24, 10, seed=5)
    labels, sqdist = kmeans.assigner(backend, centroids).assign(x)
    sq = ((x[:, None, :].astype(np.float64) - centroids[None]) ** 2).sum(-1)
    assert np.array_equal(labels, sq.argmin(1))
    np.testing.assert_allclose(sqdist, sq.min(1), rtol=1e-3, atol=1e-3)
