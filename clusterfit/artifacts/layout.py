"""Where every artifact lives under the experiment root: the one place folder and file names are spelled.

    features/<split>/<layer>/part-<rank>-<chunk>.npy (+ -index.npy)   extract, one chunk marker each
    features/<split>/data_limit_indices.npy                           the images DATA_LIMIT kept
    clusters/<layer>-k<K>/centroids.npy labels.npy distances.npy stats.json <split>/labels.npy [pca_*.npy]
    pretrain/ train/    final.pt metrics.jsonl latest.json checkpoints/e####-s#########.pt
    train-k<K>/         the same, per K of a sweep (CLUSTERFIT.NUM_CLUSTERS as a list)
    supervised/         the same, trained on the true labels (EVALUATE.BASELINES has supervised)
    eval/               metrics.json report.md report.html *.png
    seed-<seed>/ summary/   with EXPERIMENT.SEEDS: one experiment per seed, and metrics.json + report over them
    logs/<step>/<pod>.log                                                the controller's saved pod logs
    _lease.json         who runs the experiment now, until when (clusterfit/lease.py); gone when no one does
                        (a local root keeps the hidden lock file `._lease.json.lock` beside it)

Each step folder is published by its `_SUCCESS.json`, written last. Pure names: no I/O here.
"""

from __future__ import annotations

import re

from clusterfit.config import Config

MANIFEST = "_SUCCESS.json"
LEASE = "_lease.json"  # at the experiment root, while a run holds it

# Step folders.
PRETRAIN = "pretrain"
TRAIN = "train"
SUPERVISED = "supervised"
EVAL = "eval"
SUMMARY = "summary"  # over EXPERIMENT.SEEDS, beside seed-<seed>/ (clusterfit/seeds.py)
LOGS = "logs"

# pretrain/ and train/: the published network, its per-epoch metrics, and the resumable checkpoints.
FINAL_CHECKPOINT = "final.pt"
METRICS_LOG = "metrics.jsonl"
LATEST_POINTER = "latest.json"  # names the newest checkpoint; moved only after that checkpoint is written
CHECKPOINTS = "checkpoints"

# clusters/<name>/
CENTROIDS = "centroids.npy"
LABELS = "labels.npy"
DISTANCES = "distances.npy"
CLUSTER_STATS = "stats.json"
# With CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION: y = (x - mean) @ components.T, whitening folded in.
PCA_MEAN = "pca_mean.npy"  # float32 (D,)
PCA_COMPONENTS = "pca_components.npy"  # float32 (N, D)
CLUSTER_WORK = "_work"

# features/<split>/ when DATA_LIMIT keeps a subset: the kept images' indices (int64, ascending) in the whole
# dataset; the manifest key names the file.
DATA_LIMIT_INDICES = "data_limit_indices.npy"
DATA_LIMIT_INDICES_KEY = "data_limit_indices"

# Manifest keys with clusterfit.data.images_identity (which images, in which order): extract's for its split;
# cluster's, per label file name, for the labels it wrote (what training checks LABEL_PATHS against).
IMAGES_KEY = "images"
LABELS_IMAGES_KEY = "labels_images"
# Manifest key of extract, pretrain and train with DATA.ON_BAD_IMAGE=skip: the images skipped, counted per reason
# (clusterfit.image_files.REASONS), e.g. {"not_an_image": 2, "zero_bytes": 1}.
SKIPPED_BY_REASON_KEY = "skipped_by_reason"

# VISSL's tools/cluster_features_and_label.py writes <prefix>_labels.npy (in extraction-shard order)
# beside <prefix>_images.npy (each label's image path).
VISSL_LABELS_SUFFIX = "_labels.npy"
VISSL_IMAGES_SUFFIX = "_images.npy"

# eval/
EVAL_METRICS = "metrics.json"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CLUSTER_SIZES_PNG = "cluster_sizes.png"
CLUSTER_EXAMPLES_PNG = "cluster_examples.png"
TRAINING_CURVES_PNG = "training_curves.png"
SWEEP_PNG = "k_sweep.png"

_PART = re.compile(r"^(?P<layer>[^/]+)/part-(?P<rank>\d+)-(?P<chunk>\d+)\.npy$")


def features_folder(partition: str) -> str:
    return f"features/{partition.lower()}"


def extract_partitions(cfg: Config) -> list[str]:
    """The configured splits extract writes: the clustered one first, then EXTRACT.PARTITIONS."""
    wanted = dict.fromkeys([cfg.CLUSTERFIT.FEATURES.DATA_PARTITION, *cfg.EXTRACT.PARTITIONS])
    return [p for p in wanted if cfg.split(p).enabled]


def part_name(layer: str, rank: int, chunk: int) -> str:
    """One chunk's features of one layer, relative to the features folder."""
    return f"{layer}/part-{rank:05d}-{chunk:06d}.npy"


def index_name(part: str) -> str:
    """The dataset indices (int64) that go with a part file."""
    return part[: -len(".npy")] + "-index.npy"


def parse_part(name: str) -> tuple[str, int] | None:
    """(layer, chunk) of a part file name, None for any other file (index files included)."""
    match = _PART.match(name)
    return (match["layer"], int(match["chunk"])) if match else None


def chunk_marker(folder: str, chunk: int) -> str:
    """The marker that makes an extracted chunk count as done."""
    return f"{folder}/_chunks/chunk-{chunk:06d}.json"


def cluster_name(cfg: Config) -> str:
    return f"{cfg.CLUSTERFIT.FEATURES.LAYER_NAME}-k{cfg.CLUSTERFIT.NUM_CLUSTERS}"


def cluster_folder(cfg: Config) -> str:
    return f"clusters/{cluster_name(cfg)}"


def train_folder(cfg: Config) -> str:
    """Where the network trained on cfg's K clusters goes: train/, or train-k<K>/ in a sweep over K."""
    return f"{TRAIN}-k{cfg.CLUSTERFIT.NUM_CLUSTERS}" if cfg.CLUSTERFIT.is_sweep else TRAIN


def cluster_folders(cfg: Config) -> list[str]:
    return [cluster_folder(cfg.with_num_clusters(k)) for k in cfg.CLUSTERFIT.cluster_counts]


def train_folders(cfg: Config) -> list[str]:
    """Every network the train step publishes: one per K, then the supervised upper bound when asked for."""
    folders = [train_folder(cfg.with_num_clusters(k)) for k in cfg.CLUSTERFIT.cluster_counts]
    return folders + ([SUPERVISED] if "supervised" in cfg.EVALUATE.BASELINES else [])


def split_file(split: str, name: str, main_split: str) -> str:
    """A per-split cluster file: `labels.npy` for the clustered split, `<split>/labels.npy` for the others."""
    return name if split == main_split else f"{split.lower()}/{name}"


def cluster_work(folder: str, fingerprint: str) -> str:
    """Scratch space where ranks exchange centroids and assignments; all of CLUSTER_WORK goes after publication."""
    return f"{folder}/{CLUSTER_WORK}/{fingerprint[:16]}"


def assignment_name(split: str, rank: int) -> str:
    return f"assign-{split}-rank{rank:05d}.npy"


def vissl_image_list(labels_uri: str) -> str:
    """The image list VISSL writes beside a label file: `x_labels.npy` -> `x_images.npy`, else `x_images.npy`
    beside `x.npy`."""
    stem = labels_uri.removesuffix(VISSL_LABELS_SUFFIX)
    if stem == labels_uri:
        stem = labels_uri.removesuffix(".npy")
    return stem + VISSL_IMAGES_SUFFIX


def checkpoint_name(epoch: int, step: int) -> str:
    """Sorts in training order, so the newest checkpoints are the last names listed."""
    return f"{CHECKPOINTS}/e{epoch:04d}-s{step:09d}.pt"


def pod_log(step: str, pod: str) -> str:
    """The controller's copy of a step pod's log (the crashed container's, then the current one's), rewritten
    while the step runs and when it ends: what `clusterfit logs` prints once the pod is gone."""
    return f"{LOGS}/{step}/{pod}.log"


def step_folders(cfg: Config, step: str) -> list[str]:
    """The folders whose `_SUCCESS.json` together mean `step` finished (what the controller checks)."""
    if step == "extract":
        return [features_folder(p) for p in extract_partitions(cfg)]
    return {"pretrain": [PRETRAIN], "cluster": cluster_folders(cfg), "train": train_folders(cfg), "evaluate": [EVAL]}[
        step
    ]
