"""The k-means backends against each other and against scikit-learn, from the same start."""

from __future__ import annotations

import logging

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


@pytest.mark.parametrize(
    "version,k,dim,unit_sphere,expected",
    [
        ("1.15.1", 16000, 2048, True, "superkmeans"),  # ImageNet's K and res5: SuperKMeans's ground
        ("1.14.3", 16000, 2048, True, "superkmeans"),  # the first release with it
        ("1.14.1.post1", 16000, 2048, True, "lloyd"),  # the GPU image's faiss has no SuperKMeans
        ("1.8.0", 16000, 2048, False, "lloyd"),
        ("1.15.1", 2000, 2048, True, "lloyd"),  # faiss: not for near-unit-sphere data with k < 4096
        ("1.15.1", 2000, 2048, False, "superkmeans"),
        ("1.15.1", 500, 2048, False, "lloyd"),  # faiss: small k
        ("1.15.1", 16000, 512, True, "lloyd"),  # our measurement: loses at small d
    ],
)
def test_auto_chooses_by_faiss_version_k_and_dim(
    version: str, k: int, dim: int, unit_sphere: bool, expected: str
) -> None:
    choice = kmeans.choose_algorithm(
        "auto", backend="faiss", faiss_version=version, k=k, dim=dim, unit_sphere=unit_sphere
    )
    assert choice.algorithm == expected
    record = choice.record()
    assert record["requested"] == "auto" and record["faiss_version"] == version
    assert (record["k"], record["dim"], record["algorithm"]) == (k, dim, expected) and record["reason"]


def test_the_choice_does_not_depend_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same config gives the same algorithm whether faiss sees GPUs or not."""
    chosen = []
    for gpus in (0, 4):
        monkeypatch.setattr(kmeans, "faiss_gpus", lambda gpus=gpus: gpus)
        chosen.append(kmeans.plan("auto", "faiss", k=16000, dim=2048, unit_sphere=False).algorithm)
    assert chosen[0] == chosen[1]


@pytest.mark.parametrize(
    "version,has", [("1.14.1.post1", False), ("1.14.2", False), ("1.14.3", True), ("1.15.0rc1", True), ("2.0", True)]
)
def test_superkmeans_arrived_in_faiss_1_14_3(version: str, has: bool) -> None:
    assert kmeans.has_superkmeans(version) is has


def test_explicit_superkmeans_on_an_old_faiss_names_the_key_and_the_version() -> None:
    with pytest.raises(kmeans.KMeansError, match=r"CLUSTERFIT\.ALGORITHM.*1\.14\.1\.post1.*1\.14\.3"):
        kmeans.choose_algorithm(
            "superkmeans", backend="faiss", faiss_version="1.14.1.post1", k=16000, dim=2048, unit_sphere=True
        )


def test_torch_backend_runs_lloyd_and_refuses_superkmeans() -> None:
    x = blobs(600, 8, 4, seed=6)
    result = kmeans.train("torch", x, 4, niter=3, seed=0, max_points_per_centroid=256, algorithm="auto")
    assert result.algorithm.startswith("torch-lloyd") and result.extra["algorithm_choice"]["algorithm"] == "lloyd"
    with pytest.raises(kmeans.KMeansError, match="CLUSTER_BACKEND"):
        kmeans.train("torch", x, 4, niter=3, seed=0, max_points_per_centroid=256, algorithm="superkmeans")


def test_faiss_training_records_its_choice(caplog: pytest.LogCaptureFixture) -> None:
    x = blobs(600, 8, 4, seed=7)
    with caplog.at_level(logging.INFO, logger="clusterfit.kmeans"):
        result = kmeans.train("faiss", x, 4, niter=3, seed=0, max_points_per_centroid=256, algorithm="auto")
    assert "k-means: lloyd (" in caplog.text and "CLUSTERFIT.ALGORITHM=auto" in caplog.text, caplog.text
    choice = result.extra["algorithm_choice"]
    assert choice["algorithm"] == "lloyd" and choice["faiss_version"] == kmeans.faiss_version()
    assert result.algorithm == "faiss-lloyd"


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
