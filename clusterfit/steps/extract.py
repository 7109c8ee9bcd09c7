r"""Step 1a: features of every image, chunk by chunk, from the starting model.

    clusterfit extract config=quickstart
    clusterfit extract config=quickstart config.DISTRIBUTED.NUM_PROC_PER_NODE=2   # two local ranks
    torchrun --nproc-per-node 8 -m clusterfit extract \
        config=pretrain/clusterfit/cluster_features_resnet_8gpu_rotation_in1k

Writes `features/<split>/<layer>/part-<rank>-<chunk>.npy` (n x D; float32, or float16/bfloat16 with
EXTRACT.STORAGE_DTYPE, named in the manifest) with `...-index.npy` (int64 dataset indices). The
dataset is cut into chunks of EXTRACT.CHUNK_SIZE consecutive indices; chunk c belongs to rank
c % world_size, so every index is extracted exactly once, with no padding. Memory holds one chunk.
A chunk is done when its marker `_chunks/chunk-<c>.json` exists and carries this config's
fingerprint: a restarted extraction skips those, and one with other weights, transforms or data
redoes them. Rank 0 publishes `_SUCCESS.json` after all chunks. An image DATA.ON_BAD_IMAGE=skip
skipped has no features: the manifest lists its index (`skipped_indices`, where cluster's labels
get -1) and counts it per reason (`skipped_by_reason`), and a warning names the first few.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from clusterfit import artifacts, distributed
from clusterfit.artifacts.features import (
    FLOAT16_MAX,
    STORAGE_DTYPE_KEY,
    InputError,
    encode_features,
)
from clusterfit.artifacts.layout import (
    DATA_LIMIT_INDICES,
    DATA_LIMIT_INDICES_KEY,
    IMAGES_KEY,
    SKIPPED_BY_REASON_KEY,
    chunk_marker,
    extract_partitions,
    features_folder,
    index_name,
    parse_part,
    part_name,
)
from clusterfit.artifacts.lineage import StartWeights, start_weights
from clusterfit.config import Config
from clusterfit.data import (
    ImageDataset,
    ImageSource,
    build_dataset,
    dataset_identity,
    eval_transform,
    images_identity,
    subset_indices,
)
from clusterfit.image_files import count_reasons
from clusterfit.models import Network, amp_enabled, forward_features, memory_format
from clusterfit.runtime import progress
from clusterfit.storage import NotFound, Store, array_to_bytes, open_store
from clusterfit.weights import starting_model

log = logging.getLogger(__name__)


@dataclass
class ExtractResult:
    folders: list[str]
    skipped_partitions: list[str]  # already published with this config
    chunks_computed: int

    @property
    def skipped(self) -> bool:
        """Whether every split was already published: the step did no work."""
        return len(self.skipped_partitions) == len(self.folders)


def run(cfg: Config) -> ExtractResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND, cfg.DISTRIBUTED.TIMEOUT_S)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    log.info("extract: artifact root %s", store.uri())
    start = start_weights(cfg, store)
    layers = feature_layers(cfg)
    result = ExtractResult([], [], 0)
    fmt = memory_format(cfg.MODEL.CHANNELS_LAST)
    model: Network | None = None
    for partition in extract_partitions(cfg):
        folder = features_folder(partition)
        fp = fingerprint(cfg, partition, start, layers, amp_enabled(cfg.MODEL.AMP_PARAMS.USE_AMP, dist.device))
        result.folders.append(folder)
        if artifacts.skip_if_published(store, folder, fp, f"extract {partition}"):
            result.skipped_partitions.append(partition)
            continue
        # The starting model, built once for every split that needs it.
        if model is None:
            model = starting_model(cfg, start).to(dist.device).to(memory_format=fmt).eval()
        # This rank's unfinished chunks, each written with its marker as soon as it is complete.
        dataset = build_dataset(cfg, partition, eval_transform(cfg.DATA.TRANSFORMS))
        result.chunks_computed += extract_chunks(cfg, store, folder, fp, model, dataset, layers, dist)
        # Publication: rank 0, once every rank's chunks are done.
        distributed.barrier()
        if dist.is_main:
            publish(cfg, store, folder, partition, fp, start, layers, dataset.source)
        distributed.barrier()
    log.info("extract: done; features under %s", store.uri("features"))
    return result


def feature_layers(cfg: Config) -> list[str]:
    return [cfg.CLUSTERFIT.FEATURES.LAYER_NAME]


def model_identity(cfg: Config, start: StartWeights, layers: list[str]) -> dict[str, Any]:
    """What the features were computed with; cluster refuses features of another model or layer."""
    return {
        "trunk": cfg.MODEL.TRUNK.model_dump(),
        "weights": start.identity(),
        "layers": layers,
        "pool_size": cfg.EXTRACT.POOL_SIZE,
        "transforms": {
            k: v for k, v in cfg.DATA.TRANSFORMS.model_dump().items() if k.startswith(("EVAL", "MEAN", "STD"))
        },
    }


def fingerprint(cfg: Config, partition: str, start: StartWeights, layers: list[str], amp: bool) -> str:
    """The chunks' identity; the precision is in it, so a resumed step never mixes bf16 and fp32 parts."""
    tree: dict[str, Any] = {
        "model": model_identity(cfg, start, layers),
        "precision": "bf16" if amp else "fp32",
        "data": dataset_identity(cfg, partition),
        "chunk": cfg.EXTRACT.CHUNK_SIZE,
    }
    if cfg.EXTRACT.STORAGE_DTYPE != "float32":  # float32 folders keep the fingerprint they had before the key
        tree["storage"] = cfg.EXTRACT.STORAGE_DTYPE
    return artifacts.fingerprint("extract", tree, {"weights": start.digest or start.uri})


def chunk_batches(chunks: list[int], chunk_size: int, total: int, batch_size: int) -> list[list[int]]:
    """Batches of dataset indices that never straddle a chunk boundary, in chunk order."""
    batches = []
    for chunk in chunks:
        indices = list(range(chunk * chunk_size, min((chunk + 1) * chunk_size, total)))
        batches += [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    return batches


def extract_chunks(
    cfg: Config,
    store: Store,
    folder: str,
    fp: str,
    model: Network,
    dataset: ImageDataset,
    layers: list[str],
    dist: distributed.Dist,
) -> int:
    """Extract this rank's unfinished chunks (no marker, or a marker of another config); returns how many were
    computed."""
    size, total = cfg.EXTRACT.CHUNK_SIZE, len(dataset)
    num_chunks = math.ceil(total / size)
    mine = [c for c in range(num_chunks) if c % dist.world_size == dist.rank]
    todo = [c for c in mine if not chunk_done(store, folder, c, fp)]
    if len(todo) < len(mine):
        log.info(
            "extract: %d of this rank's %d chunks already done; resuming at chunk %d",
            len(mine) - len(todo),
            len(mine),
            todo[0] if todo else -1,
        )
    batches = chunk_batches(todo, size, total, cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=cfg.DATA.NUM_DATALOADER_WORKERS,
        pin_memory=dist.device.type == "cuda",
    )
    pending: dict[int, list[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]] = {}
    # bf16 autocast and channels_last as training runs; the features are written as float32.
    fmt = memory_format(cfg.MODEL.CHANNELS_LAST)
    amp = amp_enabled(cfg.MODEL.AMP_PARAMS.USE_AMP, dist.device)
    batches_seen = progress(loader, len(batches), f"extract {folder}", cfg.LOG.PROGRESS_INTERVAL_S, "batch")
    for images, index, problems in batches_seen:
        on_device = images.to(dist.device, non_blocking=True)
        feats = forward_features(model, on_device, layers, cfg.EXTRACT.POOL_SIZE, fmt, amp=amp)
        chunk = int(index[0]) // size
        pending.setdefault(chunk, []).append((index.numpy(), np.array(problems, dtype=str), feats))
        expected = min((chunk + 1) * size, total) - chunk * size
        if sum(len(b[0]) for b in pending[chunk]) == expected:
            done = pending.pop(chunk)
            write_chunk(store, folder, fp, chunk, dist.rank, layers, done, cfg.EXTRACT.STORAGE_DTYPE)
    return len(todo)


def chunk_done(store: Store, folder: str, chunk: int, fp: str) -> bool:
    """Whether the chunk's marker exists and was written for this fingerprint (not by a run of another config)."""
    try:
        marker = json.loads(store.get_bytes(chunk_marker(folder, chunk)))
    except NotFound:
        return False
    return bool(marker.get("fingerprint") == fp)


def write_chunk(
    store: Store,
    folder: str,
    fp: str,
    chunk: int,
    rank: int,
    layers: list[str],
    batches: list[Any],
    storage_dtype: str = "float32",
) -> None:
    """Write one chunk's parts, then its marker (the marker is what makes the chunk count as done). `batches`:
    (dataset indices, problems: "" for an image read, else why it was skipped, {layer: features}) each."""
    index = np.concatenate([b[0] for b in batches]).astype(np.int64)
    problem = np.concatenate([b[1] for b in batches]).astype(str)
    ok = problem == ""
    files: dict[str, dict[str, Any]] = {}
    for layer in layers:
        part = part_name(layer, rank, chunk)
        feats = np.concatenate([b[2][layer] for b in batches])[ok].astype(np.float32, copy=False)
        where = store.uri(f"{folder}/{part}")
        if not np.isfinite(feats).all():
            raise FloatingPointError(f"{where}: the model produced NaN/inf features")
        largest = float(np.abs(feats).max(initial=0.0)) if storage_dtype == "float16" else 0.0
        if largest > FLOAT16_MAX:
            raise InputError(
                f"{where}: a feature of magnitude {largest:.4g} does not fit float16 (max {FLOAT16_MAX:.0f}); "
                "set EXTRACT.STORAGE_DTYPE=bfloat16 (float32's range) or float32"
            )
        stored = encode_features(feats, storage_dtype)
        for name, array in ((part, stored), (index_name(part), index[ok])):
            data = array_to_bytes(array)
            store.put_bytes(f"{folder}/{name}", data)
            sha256 = artifacts.sha256_bytes(data)
            files[name] = {"size": len(data), "sha256": sha256, "shape": list(array.shape), "dtype": array.dtype.str}
    marker = {
        "chunk": chunk,
        "rank": rank,
        "fingerprint": fp,
        "files": files,
        "count": int(ok.sum()),
        "skipped": index[~ok].tolist(),
        "skipped_reasons": problem[~ok].tolist(),
    }
    store.put_bytes(chunk_marker(folder, chunk), json.dumps(marker).encode())


def publish(
    cfg: Config,
    store: Store,
    folder: str,
    partition: str,
    fp: str,
    start: StartWeights,
    layers: list[str],
    source: ImageSource,
) -> None:
    started = time.time()
    total = len(source)
    num_chunks = math.ceil(total / cfg.EXTRACT.CHUNK_SIZE)
    ledger = artifacts.Ledger(store, folder)
    skipped: list[int] = []
    reasons: list[str] = []
    dims: dict[str, int] = {}
    for chunk in range(num_chunks):
        marker = json.loads(store.get_bytes(chunk_marker(folder, chunk)))
        if marker.get("fingerprint") != fp:
            raise artifacts.ArtifactError(
                f"{store.uri(chunk_marker(folder, chunk))}: written for another config or input; rerun extract"
            )
        ledger.files.update(marker["files"])
        skipped += marker["skipped"]
        reasons += marker.get("skipped_reasons", ["unreadable"] * len(marker["skipped"]))  # markers before reasons
        for name, entry in marker["files"].items():
            if parsed := parse_part(name):
                dims[parsed[0]] = entry["shape"][1]
    if skipped:
        warn_skipped(partition, source, skipped, reasons)
    # Which images these are (what cluster keeps beside its labels), and which ones DATA_LIMIT kept.
    data_extra: dict[str, Any] = {IMAGES_KEY: images_identity(source)}
    kept = subset_indices(source)
    if kept is not None:
        ledger.put_array(DATA_LIMIT_INDICES, kept)
        data_extra[DATA_LIMIT_INDICES_KEY] = DATA_LIMIT_INDICES
    artifacts.publish(
        ledger,
        step="extract",
        config=cfg.model_dump(mode="json"),
        inputs={"weights": start.digest or start.uri},
        fingerprint_=fp,
        started_s=started,
        extra={
            "partition": partition,
            "dataset_name": cfg.CLUSTERFIT.FEATURES.DATASET_NAME,
            "num_images": total,
            "num_chunks": num_chunks,
            "skipped_indices": skipped,
            SKIPPED_BY_REASON_KEY: count_reasons(reasons),
            "dims": dims,
            STORAGE_DTYPE_KEY: cfg.EXTRACT.STORAGE_DTYPE,
            "model": model_identity(cfg, start, layers),
            **data_extra,
        },
    )
    log.info(
        "extract %s: published %d images x %s in %d chunks at %s", partition, total, dims, num_chunks, store.uri(folder)
    )


def warn_skipped(partition: str, source: ImageSource, skipped: list[int], reasons: list[str]) -> None:
    """One warning for the images DATA.ON_BAD_IMAGE=skip skipped: how many, per reason, and the first few."""
    first = "; ".join(f"{source.name(i)} ({reason})" for i, reason in zip(skipped[:5], reasons, strict=False))
    log.warning(
        "extract %s: %d of %d images skipped (DATA.ON_BAD_IMAGE=skip), by reason %s; the first: %s",
        partition,
        len(skipped),
        len(source),
        count_reasons(reasons),
        first,
    )
