"""Which config keys each step reads, and a digest of just those.

    from clusterfit.config.reads import step_config_hash
    step_config_hash(cfg, "train")   # unchanged by an edit to EVALUATE.PROTOCOL, changed by OPTIMIZER.BASE_LR

A step's job on Kubernetes carries this digest (clusterfit/kube/manifests.py), so an edit to a key
the step does not read leaves its running job adoptable. The table covers at least every key the
step's own fingerprint (the one `clusterfit run` skips a finished step on) depends on; a test holds
each step's fingerprint to it. Whole sections where a step reads most of one. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clusterfit.config.schema import STEPS, Config

# Every step: where its artifacts live, how it reaches them, how it runs, how it logs.
COMMON = ("EXPERIMENT", "STORAGE", "DISTRIBUTED", "LOG")

STEP_READS: dict[str, tuple[str, ...]] = {
    "pretrain": (*COMMON, "DATA", "MODEL", "PRETRAIN", "CHECKPOINT"),
    # PIPELINE.STEPS: whether it starts from pretrain's weights; the clustered layer is the one extracted.
    "extract": (*COMMON, "DATA", "MODEL", "EXTRACT", "PIPELINE.STEPS", "CLUSTERFIT.FEATURES"),
    "cluster": (*COMMON, "DATA", "MODEL", "EXTRACT", "CLUSTERFIT"),
    # EVALUATE.BASELINES: the train step also trains the supervised upper bound when it is asked for.
    "train": (*COMMON, "DATA", "MODEL", "OPTIMIZER", "CHECKPOINT", "CLUSTERFIT", "EVALUATE.BASELINES"),
    "evaluate": (*COMMON, "DATA", "MODEL", "EXTRACT", "CLUSTERFIT", "EVALUATE"),
}


def covered(path: str, step: str) -> bool:
    """Whether the dotted key `path` (say EVALUATE.PROTOCOL) is among what `step` reads."""
    return any(path == key or path.startswith(f"{key}.") for key in STEP_READS[step])


def step_config(cfg: Config, step: str) -> dict[str, Any]:
    """The part of the config `step` reads, as plain JSON values keyed by dotted path."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    tree = cfg.model_dump(mode="json")
    picked: dict[str, Any] = {}
    for key in STEP_READS[step]:
        value: Any = tree
        for part in key.split("."):
            value = value[part]
        picked[key] = value
    return picked


def step_config_hash(cfg: Config, step: str) -> str:
    """sha256 of `step_config`'s canonical JSON."""
    canonical = json.dumps(step_config(cfg, step), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
