"""Where extraction's starting weights come from: the user's checkpoint, pretrain's output, or none.

Extract loads them, cluster checks that its features were made from them, evaluate measures them;
all three ask here, so they cannot disagree. No deep-learning import (the cluster image has no torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from clusterfit.artifacts.layout import FINAL_CHECKPOINT, PRETRAIN
from clusterfit.artifacts.manifest import read_manifest
from clusterfit.config import Config, WeightsInitConfig
from clusterfit.storage import Store


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
        return StartWeights(store.uri(f"{PRETRAIN}/{FINAL_CHECKPOINT}"), WeightsInitConfig(), str(manifest["_digest"]))
    return StartWeights("", None, "")
