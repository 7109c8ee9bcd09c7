"""Which config keys each step reads, and a digest of just those.

    from clusterfit.config.reads import changed_keys, step_config_hash
    step_config_hash(cfg, "train")   # unchanged by an edit to EVALUATE.PROTOCOL, changed by OPTIMIZER.BASE_LR
    changed_keys(manifest["config"], cfg, "train")   # ["OPTIMIZER.BASE_LR"]: the published train is outdated

A step's job on Kubernetes carries this digest (clusterfit/kube/manifests.py), so an edit to a key
the step does not read leaves its running job adoptable, and the controller reruns a published step
only when a key it reads changed since (`changed_keys`). The table covers at least every key the
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
    return under(path, STEP_READS[step])


def under(path: str, keys: tuple[str, ...]) -> bool:
    """Whether the dotted key `path` is one of `keys` or inside one of them."""
    return any(path == key or path.startswith(f"{key}.") for key in keys)


def step_config(cfg: Config, step: str) -> dict[str, Any]:
    """The part of the config `step` reads, as plain JSON values keyed by dotted path."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}: one of {', '.join(STEPS)}")
    return pick(cfg.model_dump(mode="json"), STEP_READS[step])


def pick(tree: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """{dotted key: its value in `tree`} for each key of `keys` that `tree` holds."""
    picked: dict[str, Any] = {}
    for key in keys:
        value: Any = tree
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                break
            value = value[part]
        else:
            picked[key] = value
    return picked


def leaves(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections flattened to {dotted key: value}; lists are values."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(leaves(value, f"{path}."))
        else:
            flat[path] = value
    return flat


# Keys that say how a step runs or where it logs, not what it publishes: an edit to one of them does
# not make a published step outdated (its job's spec hash still covers them).
OPERATIONAL = ("EXPERIMENT.NAME", "EXPERIMENT.ROOT", "STORAGE", "LOG", "CHECKPOINT", "DISTRIBUTED.TIMEOUT_S")


def changed_keys(published: dict[str, Any], cfg: Config, step: str) -> list[str]:
    """The dotted keys `step` reads whose value in `cfg` differs from `published`, the whole config a step's
    `_SUCCESS.json` keeps ([]: the step's output stands for this config). A key the published config lacks
    (an older version wrote it) counts as changed; OPERATIONAL keys never do."""
    now = leaves(step_config(cfg, step))
    before = leaves(pick(published, STEP_READS[step]))
    missing = object()
    changed = (key for key in now.keys() | before.keys() if now.get(key, missing) != before.get(key, missing))
    return sorted(key for key in changed if not under(key, OPERATIONAL))


def step_config_hash(cfg: Config, step: str) -> str:
    """sha256 of `step_config`'s canonical JSON."""
    canonical = json.dumps(step_config(cfg, step), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
