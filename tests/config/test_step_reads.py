"""clusterfit.config.reads against the steps' own fingerprints: a key outside a step's reads never
changes what the local run skips that step on, so a job adopted across such an edit is the job the
local run would have kept; and every key the fingerprint depends on makes a published step outdated
for the controller (`changed_keys`), so it never skips a step the local run would redo."""

from __future__ import annotations

import copy
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import ValidationError

from clusterfit.artifacts.lineage import StartWeights
from clusterfit.config import STEPS, Config, load_config
from clusterfit.config.reads import OPERATIONAL, STEP_READS, changed_keys, covered, leaves, step_config_hash
from clusterfit.steps import cluster, evaluate, extract, pretrain, train


def fingerprints() -> dict[str, Callable[[Config], str]]:
    """Each step's fingerprint with its runtime inputs held fixed: what remains is its config."""
    start = StartWeights("s3://b/w.pt", None, "digest")
    parts = {"TRAIN": SimpleNamespace(digest="features")}
    return {
        "pretrain": pretrain.fingerprint,
        "extract": lambda cfg: extract.fingerprint(
            cfg, "TRAIN", start, extract.feature_layers(cfg), cfg.MODEL.AMP_PARAMS.USE_AMP
        ),
        "cluster": lambda cfg: cluster.fingerprint(cfg, parts),  # type: ignore[arg-type]
        "train": lambda cfg: train.fingerprint(cfg, "labels", cfg.CLUSTERFIT.NUM_CLUSTERS),
        "evaluate": lambda cfg: evaluate.fingerprint(cfg, {"train": "checkpoint"}),
    }


def candidates(value: Any) -> list[Any]:
    """Other values of the same type, tried in turn until the schema accepts one."""
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, 0]
    if isinstance(value, float):
        return [value * 2, value / 2, value + 1.0, 0.5]
    if isinstance(value, str):
        return [value + "x", "", "x", "none", "auto", "random", "first", "TEST", "TRAIN", "lloyd", "path", "res4"]
    if isinstance(value, list):
        return [value[:-1], value + value[-1:]] if value else [[1], ["x"], ["TEST"]]
    return []


def mutated(base: dict[str, Any], path: str) -> Config | None:
    """The config with `path` changed to the first other value the schema accepts, or None."""
    *parents, last = path.split(".")
    original = leaves(base)[path]
    for value in candidates(original):
        if value == original:
            continue
        tree = copy.deepcopy(base)
        node = tree
        for part in parents:
            node = node[part]
        node[last] = value
        try:
            return Config.model_validate(tree)
        except (ValidationError, ValueError):
            continue
    return None


@pytest.fixture(scope="module")
def edits() -> tuple[Config, dict[str, Config]]:
    """The quickstart config, and for each key the schema lets change, the config with it changed."""
    cfg = load_config("quickstart")
    base = cfg.model_dump(mode="json")
    changed = {path: mutated(base, path) for path in leaves(base)}
    return cfg, {path: c for path, c in changed.items() if c is not None}


@pytest.mark.parametrize("step", STEPS)
def test_a_key_outside_a_steps_reads_never_changes_its_fingerprint(
    step: str, edits: tuple[Config, dict[str, Config]]
) -> None:
    cfg, changes = edits
    fingerprint = fingerprints()[step]
    published = cfg.model_dump(mode="json")  # what the step's _SUCCESS.json keeps
    before, tried, missed, unnoticed = fingerprint(cfg), 0, [], []
    for path, changed in changes.items():
        tried += 1
        outdated = changed_keys(published, changed, step)
        if fingerprint(changed) != before and not covered(path, step):
            missed.append(path)
        if fingerprint(changed) != before and outdated != [path]:
            unnoticed.append(path)
        if not covered(path, step):
            assert step_config_hash(changed, step) == step_config_hash(cfg, step), path
            assert outdated == [], path
        else:
            assert step_config_hash(changed, step) != step_config_hash(cfg, step), path
            assert outdated in ([], [path]), (path, outdated)
    assert not missed, f"step {step}'s fingerprint reads {missed}, which STEP_READS[{step!r}] does not list"
    assert not unnoticed, f"step {step}'s fingerprint reads {unnoticed}, which changed_keys ignores (OPERATIONAL?)"
    assert tried > 100, f"only {tried} keys could be changed: the test would prove little"


def test_an_evaluate_edit_leaves_train_alone_but_the_supervised_baseline_does_not() -> None:
    cfg = load_config("quickstart")
    protocol = load_config("quickstart", {"EVALUATE.PROTOCOL": "vissl_linear"})
    baselines = load_config("quickstart", {"EVALUATE.BASELINES": ["random", "pixels", "supervised"]})
    assert step_config_hash(protocol, "train") == step_config_hash(cfg, "train")
    assert step_config_hash(protocol, "evaluate") != step_config_hash(cfg, "evaluate")
    assert step_config_hash(baselines, "train") != step_config_hash(cfg, "train")
    assert set(STEP_READS) == set(STEPS)


def test_a_published_config_from_an_older_version_is_outdated_in_the_keys_it_lacks() -> None:
    cfg = load_config("quickstart")
    published = cfg.model_dump(mode="json")
    del published["EVALUATE"]["LINEAR_EPOCHS"]
    published["LOG"] = {}
    assert changed_keys(published, cfg, "evaluate") == ["EVALUATE.LINEAR_EPOCHS"]
    assert changed_keys(published, cfg, "train") == []
    everything = changed_keys({}, cfg, "cluster")  # a manifest without a config: every key but the operational
    assert "CLUSTERFIT.NUM_CLUSTERS" in everything and not any(key.startswith(OPERATIONAL) for key in everything)
