"""`clusterfit run`: every step in order, a report at the end, and a rerun that does no work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.browser import view
from tests.conftest import cli, tiny_overrides


def test_run_end_to_end_then_rerun_does_nothing(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    overrides = [*tiny_overrides(root), "config.DATA.TRAIN.DATA_LIMIT=320", "config.DATA.TEST.DATA_LIMIT=200"]
    first = cli("run", *overrides)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Ran pretrain, extract, cluster, train, evaluate." in first.stdout
    assert f"Report: {(root / 'eval/report.html').as_uri()}" in first.stdout
    metrics = json.loads((root / "eval/metrics.json").read_text())
    models = {(r["model"], r["layer"]) for r in metrics["rows"]}
    assert {
        ("pixels", "pixels"),
        ("random", "res4"),
        ("start", "res4"),
        ("start", "res5avg"),
        ("clusterfit", "res5avg"),
    } <= models
    assert {c["verdict"] for c in metrics["comparison"]} <= {"better", "worse", "within noise"}
    # res4 and res5avg x (kNN, kNN 1-shot, kNN 10-shot, linear): the quickstart's EVALUATE.LOW_SHOT is [1, 10]
    assert len(metrics["comparison"]) == 8 and 0.0 <= metrics["clusters"]["TRAIN"]["nmi"] <= 1.0
    ten_shot = next(r for r in metrics["rows"] if r["model"] == "clusterfit" and r["layer"] == "res5avg")["low_shot"][
        "10"
    ]
    assert len(ten_shot["per_draw"]) == 20 and ten_shot["top1"] == pytest.approx(sum(ten_shot["per_draw"]) / 20)
    report = (root / "eval/report.md").read_text()
    assert "Did ClusterFit beat the features it started from?" in report and "| clusterfit | res5avg |" in report
    assert "kNN 10-shot top-1 (%)" in report and "- res5avg kNN 1-shot top-1: ClusterFit" in report
    counts = [sum(c["verdict"] == v for c in metrics["comparison"]) for v in ("better", "worse", "within noise")]
    summary = "Summary: ClusterFit vs. start is better on {} of 8 metrics, worse on {}, within noise on {}.".format(
        *counts
    )
    assert summary in report and summary in first.stdout
    for png in ("cluster_sizes.png", "cluster_examples.png", "training_curves.png"):
        assert (root / "eval" / png).read_bytes()[:4] == b"\x89PNG"
    # What users see: the HTML report in a real browser, every image decoded, the evaluation table there.
    page = view(root / "eval/report.html")
    (tmp_path / "report.png").write_bytes(page.screenshot)
    assert page.broken_images == [] and len(page.images) == 3, page.images
    assert "Example images per cluster (nearest to the centroid first)" in page.headings
    table = next(t for t in page.tables if t[0][:4] == ["model", "layer", "dim", "kNN top-1 (%)"])
    assert {(row[0], row[1]) for row in table[1:]} == models

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = cli("run", *overrides)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Nothing to do: all 5 steps are already done" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_a_changed_setting_reruns_only_the_steps_it_affects(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    base = [*tiny_overrides(root), "config.DATA.TRAIN.DATA_LIMIT=256", "config.PIPELINE.STEPS=[extract,cluster]"]
    assert cli("run", *base).returncode == 0
    changed = cli("run", *base, "config.CLUSTERFIT.N_ITER=3")
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "Ran cluster; skipped extract (already done)." in changed.stdout
