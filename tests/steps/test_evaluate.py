"""The evaluate step: cluster agreement against the labels training used, VISSL's linear benchmark on tiny data."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from clusterfit import artifacts, report
from clusterfit.artifacts.layout import LABELS, cluster_folder, split_file
from clusterfit.config import Config
from clusterfit.data import build_source
from clusterfit.labels import load_labels
from clusterfit.models import build_network
from clusterfit.probes import compare, unpack_correct
from clusterfit.steps.evaluate import cluster_agreement, vissl_linear_rows
from clusterfit.storage import Store, open_store
from tests.conftest import tiny_config


def publish_clusters(store: Store, cfg: Config, train: np.ndarray, test: np.ndarray) -> None:
    """A cluster folder as the cluster step leaves it: TRAIN labels and the TEST assignment."""
    ledger = artifacts.Ledger(store, cluster_folder(cfg))
    ledger.put_array(LABELS, train)
    ledger.put_array(split_file("TEST", LABELS, "TRAIN"), test)
    artifacts.publish(ledger, step="cluster", config={}, inputs={}, fingerprint_="test", started_s=time.time())


def test_nmi_and_ari_score_the_labels_training_used(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    y_train, y_test = np.repeat(np.arange(4), 25), np.repeat(np.arange(4), 10)
    own_train, own_test = rng.integers(0, 8, 100), rng.integers(0, 8, 40)
    limit = {"CLUSTERFIT.NUM_CLUSTERS": 8, "DATA.TRAIN.DATA_LIMIT": 100}
    cfg = tiny_config(tmp_path / "exp", **limit)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    publish_clusters(store, cfg, own_train, own_test)
    # Without LABEL_PATHS, training used the experiment's own clusters: both splits are scored against them.
    labels, source, _ = load_labels(cfg, store, len(y_train))
    own = cluster_agreement(store, cfg, labels, y_train, y_test)
    assert own["TRAIN"]["nmi"] == pytest.approx(normalized_mutual_info_score(y_train, own_train))
    assert own["TEST"]["ari"] == pytest.approx(adjusted_rand_score(y_test, own_test))
    assert source.endswith(f"{cluster_folder(cfg)}/{LABELS}")
    # With LABEL_PATHS, training used that file (here the classes renamed): NMI = ARI = 1, whatever the folder holds.
    path = tmp_path / "given.npy"
    np.save(path, (y_train * 3 + 1) % 8)
    trust = {"DATA.TRAIN.TRUST_LABEL_ORDER": "true"}  # a bare .npy: labels.py asks us to vouch for its order
    given = tiny_config(tmp_path / "exp", **limit, **trust, **{"DATA.TRAIN.LABEL_PATHS": f"[{path}]"})
    labels, source, _ = load_labels(given, store, len(y_train))
    theirs = cluster_agreement(store, given, labels, y_train, y_test)
    assert theirs["TRAIN"] == {"nmi": pytest.approx(1.0), "ari": pytest.approx(1.0)}
    assert "TEST" not in theirs  # the experiment's TEST assignment belongs to other labels than training used
    assert source == str(path)


def test_vissl_linear_trains_bn_heads_on_a_frozen_trunk_and_reports_per_image_correctness(tmp_path: Path) -> None:
    overrides = {
        "EVALUATE.PROTOCOL": "vissl_linear",
        "EVALUATE.LAYERS": "[res4,res5avg]",
        "EVALUATE.VISSL_LINEAR.BATCH_SIZE": 16,
        "EVALUATE.VISSL_LINEAR.OPTIMIZER.NUM_EPOCHS": 2,
        "DATA.TRAIN.DATA_LIMIT": 48,
        "DATA.TEST.DATA_LIMIT": 32,
    }
    cfg = tiny_config(tmp_path / "exp", **overrides)
    torch.manual_seed(0)
    model = build_network(cfg.MODEL.TRUNK)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    y_train, y_test = (np.asarray(build_source(cfg, p).targets, dtype=np.int64) for p in ("TRAIN", "TEST"))
    rows = vissl_linear_rows(cfg, "random", model, y_train, y_test, torch.device("cpu"))
    assert [r["layer"] for r in rows] == ["res4", "res5avg"]
    assert [r["dim"] for r in rows] == [256 * 3 * 3, 512]  # resnet18's res4 on VISSL's 3x3 grid; res5avg as it is
    for r in rows:
        correct = unpack_correct(r["correct"]["linear_top1"], len(y_test))
        assert r["protocol"] == "vissl_linear" and r["model"] == "random"
        assert r["linear_top1"] == pytest.approx(100.0 * correct.mean())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN running statistics untouched
    # Into metrics.json and the report as the quick probe's rows go: a paired verdict per layer, VISSL's name.
    ours = [{**r, "model": "clusterfit"} for r in rows]
    metrics: dict[str, Any] = {
        "protocol": "vissl_linear",
        "rows": rows + ours,
        "clusters": {},
        "comparison": compare(rows + ours, len(y_test)),
        "n_train": len(y_train),
        "n_test": len(y_test),
        "start_weights": "random init",
    }
    assert [(c["metric"], c["test"], c["verdict"]) for c in metrics["comparison"]] == [
        ("linear_top1", "McNemar mid-p", "within noise")
    ] * 2
    text = report.markdown(cfg, json.loads(json.dumps(metrics)), [])
    assert "## Evaluation (VISSL linear benchmark)" in text and "| clusterfit | res4 | 2304 |" in text
    assert "- res4 VISSL linear top-1: ClusterFit" in text
