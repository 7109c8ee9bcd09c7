"""Where each step's artifacts live under the experiment root, and what every step shares:
the starting weights (a user's checkpoint, pretrain's output, or none) and the fingerprint keys.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from clusterfit.artifacts import ArtifactError, read_manifest
from clusterfit.config import Config, WeightsInitConfig
from clusterfit.storage import Store

log = logging.getLogger(__name__)

PRETRAIN = "pretrain"
TRAIN = "train"
EVAL = "eval"


def features_folder(partition: str) -> str:
    return f"features/{partition.lower()}"


def cluster_name(cfg: Config) -> str:
    return f"{cfg.CLUSTERFIT.FEATURES.LAYER_NAME}-k{cfg.CLUSTERFIT.NUM_CLUSTERS}"


def cluster_folder(cfg: Config) -> str:
    return f"clusters/{cluster_name(cfg)}"


@dataclass(frozen=True)
class StartWeights:
    """The weights extraction starts from: a URI plus the WEIGHTS_INIT options to load it, or none."""

    uri: str
    options: WeightsInitConfig | None
    digest: str

    @property
    def random(self) -> bool:
        return not self.uri

    def identity(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "options": self.options.model_dump() if self.options else None}


def start_weights(cfg: Config, store: Store) -> StartWeights:
    """MODEL.WEIGHTS_INIT.PARAMS_FILE if set, else pretrain's final.pt when pretrain runs, else random."""
    init = cfg.MODEL.WEIGHTS_INIT
    if init.PARAMS_FILE:
        return StartWeights(init.PARAMS_FILE, init, "")
    if PRETRAIN in cfg.PIPELINE.STEPS:
        manifest = read_manifest(store, PRETRAIN)
        return StartWeights(store.uri(f"{PRETRAIN}/final.pt"), WeightsInitConfig(), str(manifest["_digest"]))
    return StartWeights("", None, "")


def require_published(store: Store, folder: str, what: str) -> dict[str, Any]:
    try:
        return read_manifest(store, folder)
    except ArtifactError as exc:
        raise ArtifactError(f"{what}: {exc}") from None


def step_folders(cfg: Config, step: str) -> list[str]:
    """The folders whose `_SUCCESS.json` together mean `step` finished (what the controller checks)."""
    if step == "extract":
        wanted = dict.fromkeys([cfg.CLUSTERFIT.FEATURES.DATA_PARTITION, *cfg.EXTRACT.PARTITIONS])
        return [features_folder(p) for p in wanted if cfg.split(p).enabled]
    return {"pretrain": [PRETRAIN], "cluster": [cluster_folder(cfg)], "train": [TRAIN], "evaluate": [EVAL]}[step]
