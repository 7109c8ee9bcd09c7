"""Step 1b: k-means of the extracted features into NUM_CLUSTERS pseudo-labels.

    clusterfit cluster config=quickstart
    clusterfit cluster config=quickstart config.CLUSTERFIT.NUM_CLUSTERS=30 config.CLUSTERFIT.CLUSTER_BACKEND=torch

VISSL's defaults: features L2-normalised, seeded, N_ITER iterations, centroids trained on a seeded
sample of at most K x MAX_POINTS_PER_CENTROID (and DATA_LIMIT) points, optionally PCA-reduced first
(FEATURES.DIMENSIONALITY_REDUCTION, fitted on that sample). Then every feature is assigned by streaming
over the part files, so memory holds all features only when they fit (FeatureParts caches them
then). Several ranks (RANK/WORLD_SIZE) split the assignment by part; rank 0 trains the centroids
and merges, coordinating through the artifact store, so this step needs no torch.

Writes `clusters/<layer>-k<K>/`: centroids.npy (float32 K x D), labels.npy (int64, one per dataset
index, in dataset order, -1 for images skipped at extraction), distances.npy (float32 squared L2),
stats.json (with the k-means algorithm chosen and why), pca_mean.npy + pca_components.npy with PCA,
and `<split>/labels.npy` + `<split>/distances.npy` for the other extracted splits (FEATURES.TEST_PARTITION).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from clusterfit import artifacts, kmeans
from clusterfit.artifacts.features import FeatureParts, InputError
from clusterfit.artifacts.layout import (
    CENTROIDS,
    CLUSTER_STATS,
    CLUSTER_WORK,
    DISTANCES,
    IMAGES_KEY,
    LABELS,
    LABELS_IMAGES_KEY,
    PCA_COMPONENTS,
    PCA_MEAN,
    assignment_name,
    cluster_folder,
    cluster_work,
    features_folder,
    split_file,
)
from clusterfit.artifacts.lineage import start_weights
from clusterfit.config import Config
from clusterfit.results import Results, one_or_all
from clusterfit.runtime import Ranks, ranks_from_env, wait_for_keys
from clusterfit.storage import Store, array_to_bytes, open_store

log = logging.getLogger(__name__)
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this many training points per centroid


@dataclass
class ClusterResult:
    folder: str
    skipped: bool
    num_points: int = 0
    empty_clusters: int = 0


def run(cfg: Config) -> ClusterResult | Results:
    """Every K the experiment covers: NUM_CLUSTERS, or each of a sweep in order (each its own folder)."""
    results = [cluster(cfg.with_num_clusters(k)) for k in cfg.CLUSTERFIT.cluster_counts]
    return one_or_all(results)


def cluster(cfg: Config) -> ClusterResult:
    """k-means into cfg.CLUSTERFIT.NUM_CLUSTERS clusters, published in its cluster folder."""
    ranks = ranks_from_env()
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    folder = cluster_folder(cfg)
    main_split = cfg.CLUSTERFIT.FEATURES.DATA_PARTITION
    # Inputs: the published features of every extracted split, checked against the config.
    parts: dict[str, FeatureParts] = {main_split: open_features(cfg, store, main_split)}
    for split in other_splits(cfg, store, main_split):
        parts[split] = open_features(cfg, store, split)
    fp = fingerprint(cfg, parts)
    if artifacts.skip_if_published(store, folder, fp, "cluster"):
        return ClusterResult(folder, True)
    log.info("cluster: writing to %s", store.uri(folder))
    started = time.time()
    check_sizes(cfg, parts[main_split].num_rows)
    # Centroids: rank 0 trains them on a seeded sample; the other ranks wait for them.
    work = cluster_work(folder, fp)
    trained, sample, pca = train_centroids(cfg, parts[main_split]) if ranks.is_main else (None, None, None)
    if ranks.is_main:
        assert trained is not None
        if pca is not None:  # before the centroids: they tell the other ranks that both are there
            store.put_bytes(f"{work}/{PCA_MEAN}", array_to_bytes(pca.mean))
            store.put_bytes(f"{work}/{PCA_COMPONENTS}", array_to_bytes(pca.components))
        store.put_bytes(f"{work}/{CENTROIDS}", array_to_bytes(trained.centroids))
    centroids = trained.centroids if trained else load_when_ready(cfg, store, f"{work}/{CENTROIDS}")
    if not ranks.is_main and cfg.CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION:
        pca = load_projection(cfg, store, work)
    # Assignment: each rank streams its share of the parts of every split (rank 0 reuses the
    # prepared training sample when it is every row, instead of reading and normalising again).
    assign = kmeans.assigner(cfg.CLUSTERFIT.CLUSTER_BACKEND, centroids)
    for split, feature_parts in parts.items():
        partial = assign_parts(cfg, feature_parts, assign, ranks, sample if split == main_split else None, pca)
        store.put_bytes(f"{work}/{assignment_name(split, ranks.rank)}", array_to_bytes(partial))
    del sample
    if not ranks.is_main:
        return ClusterResult(folder, False)
    # Publication: rank 0 merges every rank's assignments, in dataset order.
    assert trained is not None
    stats = publish(cfg, store, folder, work, parts, trained, ranks, fp, started, pca)
    return ClusterResult(folder, False, parts[main_split].num_rows, stats["empty_clusters"])


def open_features(cfg: Config, store: Store, split: str) -> FeatureParts:
    folder = features_folder(split)
    parts = FeatureParts.open(store, folder, cfg.CLUSTERFIT.FEATURES.LAYER_NAME, cfg.CLUSTERFIT.CACHE_FEATURES_MB)
    check_feature_set(cfg, store, parts.manifest, folder)
    return parts


def other_splits(cfg: Config, store: Store, main_split: str) -> list[str]:
    """The extracted splits assigned besides the clustered one: FEATURES.TEST_PARTITION, else all."""
    wanted = cfg.CLUSTERFIT.FEATURES.TEST_PARTITION
    return [
        s
        for s in cfg.EXTRACT.PARTITIONS
        if s != main_split and cfg.split(s).enabled and (wanted is None or s == wanted)
    ]


def check_feature_set(cfg: Config, store: Store, manifest: dict[str, Any], folder: str) -> None:
    """Refuse features of another model or layer than the config describes."""
    model = manifest.get("model", {})
    layer = cfg.CLUSTERFIT.FEATURES.LAYER_NAME
    where = store.uri(folder)
    if layer not in model.get("layers", []):
        raise InputError(
            f"{where}: features of layer(s) {model.get('layers')}, but CLUSTERFIT.FEATURES.LAYER_NAME={layer}"
        )
    if model.get("trunk", {}).get("NAME") != cfg.MODEL.TRUNK.NAME:
        raise InputError(
            f"{where}: features of a {model.get('trunk', {}).get('NAME')}, but MODEL.TRUNK.NAME={cfg.MODEL.TRUNK.NAME}"
        )
    expected = start_weights(cfg, store).uri
    if model.get("weights", {}).get("uri", "") != expected:
        raise InputError(
            f"{where}: features from weights {model.get('weights', {}).get('uri') or '<random init>'!r}, "
            f"but the config starts from {expected or '<random init>'!r} (MODEL.WEIGHTS_INIT.PARAMS_FILE); rerun "
            "extract"
        )


def fingerprint(cfg: Config, parts: dict[str, FeatureParts]) -> str:
    keys = cfg.CLUSTERFIT.model_dump(
        mode="json", exclude={"RANK_WAIT_TIMEOUT_S", "ASSIGN_BATCH_SIZE", "NUM_CLUSTERS_SWEEP"}
    )
    return artifacts.fingerprint(
        "cluster", {"CLUSTERFIT": keys, "SEED": cfg.EXPERIMENT.SEED}, {s: p.digest for s, p in parts.items()}
    )


def check_sizes(cfg: Config, num_points: int) -> None:
    k = cfg.CLUSTERFIT.NUM_CLUSTERS
    if k > num_points:
        raise InputError(f"CLUSTERFIT.NUM_CLUSTERS={k} is larger than the number of features ({num_points}); lower it")
    if num_points < MIN_POINTS_PER_CENTROID * k:
        log.warning(
            "cluster: only %d points for %d clusters (%.1f per cluster, fewer than %d): centroids will be noisy",
            num_points,
            k,
            num_points / k,
            MIN_POINTS_PER_CENTROID,
        )


def train_centroids(
    cfg: Config, parts: FeatureParts
) -> tuple[kmeans.Centroids, np.ndarray | None, kmeans.Projection | None]:
    """Centroids from a seeded sample; that (normalised, projected) sample when it is every row, in
    part order; and the PCA fitted on it when FEATURES.DIMENSIONALITY_REDUCTION asks for one."""
    c = cfg.CLUSTERFIT
    rng = np.random.default_rng(cfg.EXPERIMENT.SEED)
    budget = c.NUM_CLUSTERS * c.MAX_POINTS_PER_CENTROID
    if c.DATA_LIMIT != -1:
        budget = min(budget, c.DATA_LIMIT)
    rows = np.sort(rng.choice(parts.num_rows, budget, replace=False)) if parts.num_rows > budget else None
    sample = parts.gather(rows)  # a fresh array: normalised in place, no second copy
    if c.L2_NORMALIZE:
        sample = kmeans.l2_normalize(sample, inplace=True)
    pca = None
    if c.FEATURES.DIMENSIONALITY_REDUCTION:
        pca = kmeans.fit_pca(sample, c.FEATURES.DIMENSIONALITY_REDUCTION, c.FEATURES.PCA_WHITENING)
        log.info(
            "cluster: PCA %d -> %d dims (%s) fitted on %d points",
            sample.shape[1],
            len(pca.components),
            c.FEATURES.PCA_WHITENING,
            len(sample),
        )
        sample = pca.apply(sample)
    log.info(
        "cluster: training %d centroids on %d of %d points (d=%d, backend %s)",
        c.NUM_CLUSTERS,
        len(sample),
        parts.num_rows,
        sample.shape[1],
        c.CLUSTER_BACKEND,
    )
    trained = kmeans.train(
        c.CLUSTER_BACKEND,
        sample,
        c.NUM_CLUSTERS,
        niter=c.N_ITER,
        seed=cfg.EXPERIMENT.SEED,
        max_points_per_centroid=c.MAX_POINTS_PER_CENTROID,
        algorithm=c.ALGORITHM,
        unit_sphere=on_unit_sphere(cfg),
    )
    trained.extra["train_points"] = len(sample)
    return trained, (sample if rows is None else None), pca


def on_unit_sphere(cfg: Config) -> bool:
    """Whether k-means sees (near) unit-norm rows: what faiss's SuperKMeans advice turns on. A plain
    PCA projection of unit rows counts (conservatively); a whitened one does not."""
    features = cfg.CLUSTERFIT.FEATURES
    whitened = features.DIMENSIONALITY_REDUCTION > 0 and features.PCA_WHITENING == "whiten"
    return cfg.CLUSTERFIT.L2_NORMALIZE and not whitened


def load_when_ready(cfg: Config, store: Store, key: str) -> np.ndarray:
    wait_for_keys(store, [key], cfg.CLUSTERFIT.RANK_WAIT_TIMEOUT_S, "rank 0's centroids")
    return store.get_array(key)


def load_projection(cfg: Config, store: Store, work: str) -> kmeans.Projection:
    """Rank 0's PCA, written before its centroids (which this rank has already waited for)."""
    mean, components = store.get_array(f"{work}/{PCA_MEAN}"), store.get_array(f"{work}/{PCA_COMPONENTS}")
    return kmeans.Projection(mean, components, l2_after=cfg.CLUSTERFIT.FEATURES.PCA_WHITENING == "whiten_l2")


def assign_parts(
    cfg: Config,
    parts: FeatureParts,
    assign: kmeans.Assigner,
    ranks: Ranks,
    prepared: np.ndarray | None = None,
    pca: kmeans.Projection | None = None,
) -> np.ndarray:
    """This rank's parts -> structured rows (index, label, sqdist).

    `prepared`: every row of `parts`, in part order, already normalised (and projected by `pca`) as
    the config asks; the parts' features are then not read again."""
    out = []
    offsets = np.cumsum([0, *parts.rows])
    for number, name in enumerate(parts.names):
        if number % ranks.world_size != ranks.rank:
            continue
        if prepared is not None:
            index, feats = parts.load_index(name), prepared[offsets[number] : offsets[number + 1]]
        else:
            index, feats = parts.load(name)
            if cfg.CLUSTERFIT.L2_NORMALIZE:
                feats = kmeans.l2_normalize(feats)
            if pca is not None:
                feats = pca.apply(feats)
        step = cfg.CLUSTERFIT.ASSIGN_BATCH_SIZE
        for start in range(0, len(feats), step):
            labels, dists = assign.assign(feats[start : start + step])
            rows = np.empty(len(labels), dtype=ASSIGN_DTYPE)
            rows["index"], rows["label"], rows["sqdist"] = index[start : start + step], labels, dists
            out.append(rows)
    return np.concatenate(out) if out else np.empty(0, dtype=ASSIGN_DTYPE)


ASSIGN_DTYPE = np.dtype([("index", "<i8"), ("label", "<i8"), ("sqdist", "<f4")])


def merge(
    store: Store, work: str, split: str, world_size: int, num_images: int, timeout_s: float
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's assignments -> labels (int64, -1 where absent) and distances, in dataset order."""
    keys = [f"{work}/{assignment_name(split, rank)}" for rank in range(world_size)]
    wait_for_keys(store, keys, timeout_s, f"the other ranks' {split} assignments")
    rows = np.concatenate([store.get_array(key) for key in keys])
    if len(rows) and np.bincount(rows["index"], minlength=num_images).max() > 1:  # no sort: O(n)
        raise RuntimeError(f"{split}: some dataset indices were assigned by more than one rank")
    labels = np.full(num_images, -1, dtype=np.int64)
    dists = np.full(num_images, np.nan, dtype=np.float32)
    labels[rows["index"]], dists[rows["index"]] = rows["label"], rows["sqdist"]
    return labels, dists


def cluster_stats(labels: np.ndarray, k: int, trained: kmeans.Centroids) -> dict[str, Any]:
    sizes = np.bincount(labels[labels >= 0], minlength=k)
    mean = sizes.mean() if k else 0.0
    return {
        "num_clusters": k,
        "num_points": int(sizes.sum()),
        "sizes": sizes.tolist(),
        "empty_clusters": int((sizes == 0).sum()),
        "smallest": int(sizes.min()),
        "largest": int(sizes.max()),
        # max/mean is faiss's imbalance view at a glance; the coefficient of variation sums it up.
        "imbalance_max_over_mean": float(sizes.max() / mean) if mean else 0.0,
        "imbalance_cv": float(sizes.std() / mean) if mean else 0.0,
        "objective_per_iteration": trained.objective,
        "algorithm": trained.algorithm,
        "algorithm_choice": trained.extra.get("algorithm_choice"),
        "train_points": trained.extra.get("train_points"),
        "train_s": trained.train_s,
    }


def publish(
    cfg: Config,
    store: Store,
    folder: str,
    work: str,
    parts: dict[str, FeatureParts],
    trained: kmeans.Centroids,
    ranks: Ranks,
    fp: str,
    started: float,
    pca: kmeans.Projection | None = None,
) -> dict[str, Any]:
    ledger = artifacts.Ledger(store, folder)
    ledger.put_array(CENTROIDS, trained.centroids)
    if pca is not None:
        ledger.put_array(PCA_MEAN, pca.mean)
        ledger.put_array(PCA_COMPONENTS, pca.components)
    main_split = cfg.CLUSTERFIT.FEATURES.DATA_PARTITION
    stats: dict[str, Any] = {}
    for split, feature_parts in parts.items():
        labels, dists = merge(
            store, work, split, ranks.world_size, feature_parts.num_images, cfg.CLUSTERFIT.RANK_WAIT_TIMEOUT_S
        )
        ledger.put_array(split_file(split, LABELS, main_split), labels)
        ledger.put_array(split_file(split, DISTANCES, main_split), dists)
        if split == main_split:
            stats = cluster_stats(labels, cfg.CLUSTERFIT.NUM_CLUSTERS, trained)
            stats["mean_sqdist"] = float(np.nanmean(dists)) if np.isfinite(dists).any() else None
            if pca is not None:
                stats["dimensionality_reduction"] = {
                    "dims_in": int(pca.components.shape[1]),
                    "dims_out": int(pca.components.shape[0]),
                    "whitening": cfg.CLUSTERFIT.FEATURES.PCA_WHITENING,
                }
    ledger.put_json(CLUSTER_STATS, stats)
    artifacts.publish(
        ledger,
        step="cluster",
        config=cfg.model_dump(mode="json"),
        fingerprint_=fp,
        started_s=started,
        inputs={s: p.digest for s, p in parts.items()},
        extra={
            "num_clusters": cfg.CLUSTERFIT.NUM_CLUSTERS,
            "layer": cfg.CLUSTERFIT.FEATURES.LAYER_NAME,
            "partition": main_split,
            # Which images each label file labels, in order (from extract): what train checks LABEL_PATHS by.
            LABELS_IMAGES_KEY: {
                split_file(s, LABELS, main_split): p.manifest.get(IMAGES_KEY) for s, p in parts.items()
            },
        },
    )
    for key in store.list(f"{folder}/{CLUSTER_WORK}/"):
        store.delete(key)
    log.info(
        "cluster: published %s: %d points, %d clusters (%d empty, sizes %d..%d), final objective %.4g",
        store.uri(folder),
        stats["num_points"],
        stats["num_clusters"],
        stats["empty_clusters"],
        stats["smallest"],
        stats["largest"],
        trained.objective[-1] if trained.objective else float("nan"),
    )
    log.info(
        "cluster: stats %s",
        json.dumps({k: v for k, v in stats.items() if k != "sizes" and k != "objective_per_iteration"}),
    )
    return stats
