"""k-means backends, thin over the libraries: faiss (Lloyd or SuperKMeans) and a torch matmul one.

The two have one shape: `train(x, k, ...) -> Centroids` and `Assigner.assign(x) -> (labels, sqdist)`.
The torch backend lives in `kmeans_torch` and is imported only when chosen: the cluster image has
no torch. Which algorithm runs is decided by `choose_algorithm` from the config, faiss's version,
K and d alone (never from the device), and recorded with its reason in `Centroids.extra`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from clusterfit.errors import UserError
from clusterfit.runtime import GPUS_ENV, check_requested_gpus

log = logging.getLogger(__name__)

# faiss's SuperKMeans prunes distance computations in a rotated space; it wins at large d and
# loses at small d (measured with faiss-cpu 1.15: 1.43x Lloyd at d=2048, 0.66x at d=256).
SUPERKMEANS_MIN_DIM = 1024
# faiss's own limits (faiss/SuperKMeans.h): first released in 1.14.3; "use when k >= 1024", and not
# for "near-unit-sphere embeddings with k < 4096 (chi-squared assumption breaks down)", which is
# what L2-normalised features are; d >= 2 * d_prime_min (16) or its constructor throws.
SUPERKMEANS_SINCE = (1, 14, 3)
SUPERKMEANS_MIN_K = 1024
SUPERKMEANS_MIN_K_UNIT_SPHERE = 4096
SUPERKMEANS_MIN_FAISS_DIM = 32


class KMeansError(UserError, ValueError):
    """A k-means request the installed libraries cannot serve; the message names the key."""


@dataclass
class Centroids:
    """Trained centroids, float32 (K, D), with the objective (sum of squared distances) per iteration."""

    centroids: np.ndarray
    objective: list[float]
    algorithm: str
    train_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Projection:
    """PCA before k-means (CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION): y = (x - mean) @ components.T,
    then rows L2-normalised when `l2_after`. mean float32 (D,), components float32 (N, D)."""

    mean: np.ndarray
    components: np.ndarray
    l2_after: bool = False

    def apply(self, x: np.ndarray, batch: int = 65536) -> np.ndarray:
        """float32 (n, D) -> float32 (n, N), a block of rows at a time (no centred copy of all of x)."""
        out = np.empty((len(x), len(self.components)), dtype=np.float32)
        for start in range(0, len(x), batch):
            out[start : start + batch] = (x[start : start + batch] - self.mean) @ self.components.T
        return l2_normalize(out, inplace=True) if self.l2_after else out


def fit_pca(x: np.ndarray, dims: int, whitening: str, batch: int = 65536) -> Projection:
    """Principal axes of float32 (n, D) x -> a Projection onto the top `dims` (float64 covariance).

    whitening 'whiten' divides each axis by its standard deviation, as VISSL's PCA (from
    DeepCluster) does, with VISSL's floor on tiny eigenvalues (1e-5 of the largest); 'whiten_l2'
    also L2-normalises the rows, as DeepCluster's preprocess_features; 'none' only projects. Each
    axis's sign is fixed (largest entry positive) so the same data give the same projection."""
    n, d = x.shape
    if not 0 < dims <= d:
        raise KMeansError(f"CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION={dims}: the features have d={d}")
    mean = x.mean(0, dtype=np.float64)
    cov = np.zeros((d, d), dtype=np.float64)
    for start in range(0, n, batch):
        centred = x[start : start + batch] - mean.astype(np.float32)
        cov += (centred.T @ centred).astype(np.float64)  # float32 products, float64 sums
    eigenvalues, vectors = np.linalg.eigh(cov / n)
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-5)
    top = np.argsort(eigenvalues)[::-1][:dims]
    axes = vectors[:, top].T  # (dims, D)
    axes *= np.sign(axes[np.arange(dims), np.abs(axes).argmax(1)])[:, None]
    if whitening != "none":
        axes /= np.sqrt(eigenvalues[top])[:, None]
    return Projection(mean.astype(np.float32), axes.astype(np.float32), l2_after=whitening == "whiten_l2")


class Assigner(Protocol):
    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x float32 (n, D) -> nearest centroid ids int64 (n,) and squared L2 distances float32 (n,)."""
        ...


def l2_normalize(x: np.ndarray, inplace: bool = False) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero); float32 (n, D) in and out.

    `inplace` overwrites a float32 x (no second copy of a large array) and returns it."""
    # einsum: no (n, D) temporary of squares (np.linalg.norm makes one; 20x slower at D=128).
    norms = np.maximum(np.sqrt(np.einsum("ij,ij->i", x, x))[:, None], 1e-12)
    if inplace and x.dtype == np.float32:
        x /= norms
        return x
    return (x / norms).astype(np.float32, copy=False)


@dataclass(frozen=True)
class Choice:
    """The k-means algorithm to run, and why (recorded in the cluster step's stats.json)."""

    requested: str
    algorithm: str  # "lloyd" or "superkmeans"
    reason: str
    backend: str
    faiss_version: str
    k: int
    dim: int
    unit_sphere: bool

    def record(self) -> dict[str, Any]:
        return asdict(self)


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.14.1.post1' -> (1, 14, 1); the leading numeric release parts only."""
    parts = []
    for part in version.split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        parts.append(int(digits.group()))
        if digits.group() != part:
            break  # '0rc1': a pre-release of that number; what follows is no release part
    return tuple(parts)


def has_superkmeans(faiss_version: str) -> bool:
    return version_tuple(faiss_version) >= SUPERKMEANS_SINCE


def choose_algorithm(
    requested: str, *, backend: str, faiss_version: str, k: int, dim: int, unit_sphere: bool
) -> Choice:
    """CLUSTERFIT.ALGORITHM -> the algorithm, from faiss's version, K and d only: the same on every device.

    `auto` takes SuperKMeans only where faiss has it and documents it for the shape (k >= 1024,
    k >= 4096 on the unit sphere) and where it measured faster (d >= SUPERKMEANS_MIN_DIM); else
    Lloyd. An explicit `superkmeans` that cannot run is an error naming the key."""

    def choice(algorithm: str, reason: str) -> Choice:
        return Choice(requested, algorithm, reason, backend, faiss_version, k, dim, unit_sphere)

    sphere = " on near-unit-sphere (L2-normalised) data" if unit_sphere else ""
    min_k = SUPERKMEANS_MIN_K_UNIT_SPHERE if unit_sphere else SUPERKMEANS_MIN_K
    since = ".".join(map(str, SUPERKMEANS_SINCE))
    if backend == "torch":
        if requested == "superkmeans":
            raise KMeansError(
                "CLUSTERFIT.ALGORITHM=superkmeans needs CLUSTERFIT.CLUSTER_BACKEND=faiss; the torch backend runs Lloyd"
            )
        return choice("lloyd", "the torch backend implements Lloyd only")
    if requested == "lloyd":
        return choice("lloyd", "CLUSTERFIT.ALGORITHM=lloyd")
    if requested == "superkmeans":
        if not has_superkmeans(faiss_version):
            raise KMeansError(
                f"CLUSTERFIT.ALGORITHM=superkmeans, but the installed faiss {faiss_version} has no SuperKMeans "
                f"(it arrived in faiss {since}); upgrade faiss or set CLUSTERFIT.ALGORITHM to lloyd or auto"
            )
        if dim < SUPERKMEANS_MIN_FAISS_DIM:
            raise KMeansError(
                f"CLUSTERFIT.ALGORITHM=superkmeans needs d >= {SUPERKMEANS_MIN_FAISS_DIM}, the features have d={dim}"
            )
        if k < min_k:
            log.warning(
                "faiss advises against SuperKMeans with k=%d < %d%s; Lloyd is the safe choice", k, min_k, sphere
            )
        return choice("superkmeans", "CLUSTERFIT.ALGORITHM=superkmeans")
    if not has_superkmeans(faiss_version):
        return choice("lloyd", f"faiss {faiss_version} has no SuperKMeans (since {since})")
    if dim < SUPERKMEANS_MIN_DIM:
        return choice("lloyd", f"d={dim} < {SUPERKMEANS_MIN_DIM}: SuperKMeans is slower than Lloyd there")
    if k < min_k:
        return choice("lloyd", f"k={k} < {min_k}{sphere}: faiss advises against SuperKMeans")
    return choice("superkmeans", f"faiss {faiss_version} has SuperKMeans, k={k} >= {min_k}{sphere}, d={dim}")


def faiss_version() -> str:
    import faiss

    return str(faiss.__version__)


def plan(requested: str, backend: str, *, k: int, dim: int, unit_sphere: bool) -> Choice:
    """`choose_algorithm` with the installed faiss (none needed for the torch backend)."""
    version = faiss_version() if backend == "faiss" else ""
    return choose_algorithm(requested, backend=backend, faiss_version=version, k=k, dim=dim, unit_sphere=unit_sphere)


def faiss_gpus() -> int:
    """The GPUs faiss can use; none in a pod that was given some is an error (runtime.check_requested_gpus)."""
    import faiss

    found = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    if not found and os.environ.get(GPUS_ENV):
        check_requested_gpus(found, f"faiss {faiss_version()}", cuda_of_faiss())
    return found


def cuda_of_faiss() -> str | None:
    """The CUDA major version faiss-gpu was built for, from its wheel's name (faiss-gpu-cu12); None on the CPU."""
    from importlib import metadata

    for dist in metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("faiss-gpu-cu"):
            return name.removeprefix("faiss-gpu-cu")
    return None


def train_faiss(
    x: np.ndarray,
    k: int,
    *,
    niter: int,
    seed: int,
    max_points_per_centroid: int,
    algorithm: str = "auto",
    unit_sphere: bool = True,
    init_centroids: np.ndarray | None = None,
) -> Centroids:
    """faiss k-means on float32 (n, D) x; `x` is already the training sample.

    `unit_sphere`: the rows are (near) unit-norm, which rules SuperKMeans out below k=4096."""
    import faiss

    n, dim = x.shape
    gpus = faiss_gpus()
    decided = plan(algorithm, "faiss", k=k, dim=dim, unit_sphere=unit_sphere)
    if init_centroids is not None and decided.algorithm != "lloyd":
        decided = replace(decided, algorithm="lloyd", reason="initial centroids given (SuperKMeans takes none)")
    chosen = decided.algorithm
    log.info("k-means: %s (%s; CLUSTERFIT.ALGORITHM=%s)", chosen, decided.reason, algorithm)
    if chosen == "superkmeans" and gpus:
        log.warning("faiss's SuperKMeans runs on the CPU; set CLUSTERFIT.ALGORITHM=lloyd to use the %d GPU(s)", gpus)
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
    extra = {"gpus": gpus, "iteration_s": iteration_s, "algorithm_choice": decided.record()}
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


def train(
    backend: str, x: np.ndarray, k: int, *, algorithm: str = "auto", unit_sphere: bool = True, **kwargs: Any
) -> Centroids:
    """k-means with CLUSTERFIT.CLUSTER_BACKEND `backend` and CLUSTERFIT.ALGORITHM `algorithm`."""
    if backend == "torch":
        from clusterfit import kmeans_torch

        decided = plan(algorithm, "torch", k=k, dim=x.shape[1], unit_sphere=unit_sphere)
        log.info("k-means: %s (%s; CLUSTERFIT.ALGORITHM=%s)", decided.algorithm, decided.reason, algorithm)
        result = kmeans_torch.train_torch(x, k, **kwargs)
        result.extra["algorithm_choice"] = decided.record()
        return result
    return train_faiss(x, k, algorithm=algorithm, unit_sphere=unit_sphere, **kwargs)


def assigner(backend: str, centroids: np.ndarray) -> Assigner:
    if backend == "torch":
        from clusterfit import kmeans_torch

        return kmeans_torch.TorchAssigner(centroids)
    return FaissAssigner(centroids)
