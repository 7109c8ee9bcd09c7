"""Several training seeds, a sweep over K and the supervised upper bound: config, layout, the combined verdict
(probes.combine_seeds), and the whole of it on Fashion-MNIST through `clusterfit run config=fashion-mnist`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pytest
import torch

from clusterfit.artifacts.layout import step_folders
from clusterfit.config import ConfigError, config_from_args
from clusterfit.probes import combine_seeds, compare, mean_rows
from clusterfit.steps import cluster as cluster_step
from tests.browser import view
from tests.conftest import cli, error_of
from tests.test_checkpoint import vissl_init_names, vissl_resnet_names
from tests.test_probes import correct_vector, row


def test_a_list_of_k_is_a_sweep_and_a_single_k_replaces_it() -> None:
    cfg = config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=[10,30,100]"])
    assert cfg.CLUSTERFIT.cluster_counts == [10, 30, 100] and cfg.CLUSTERFIT.NUM_CLUSTERS == 10
    assert cfg.with_num_clusters(30).CLUSTERFIT.NUM_CLUSTERS == 30
    assert cfg.with_num_clusters(30).CLUSTERFIT.cluster_counts == [10, 30, 100]
    single = config_from_args(
        ["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=[10,30]", "config.CLUSTERFIT.NUM_CLUSTERS=50"]
    )
    assert single.CLUSTERFIT.cluster_counts == [50] and not single.CLUSTERFIT.is_sweep
    # The dumped config (what a ConfigMap or a manifest holds) validates to the same sweep.
    again = type(cfg).model_validate(cfg.model_dump(mode="json"))
    assert again.CLUSTERFIT.cluster_counts == [10, 30, 100]


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("config.CLUSTERFIT.NUM_CLUSTERS=[10,10]", "repeats a K"),
        ("config.CLUSTERFIT.NUM_CLUSTERS=[]", "empty list"),
        ("config.CLUSTERFIT.NUM_CLUSTERS=[10,1]", "NUM_CLUSTERS_SWEEP"),
        ("config.EXPERIMENT.SEEDS=[1,1]", "EXPERIMENT.SEEDS [1, 1] repeats a seed"),
        ("config.DATA.TRAIN.LABEL_PATHS=[/x_labels.npy]", "a sweep trains on the experiment's own clusters"),
    ],
)
def test_bad_sweeps_and_seed_lists_name_the_key(override: str, needle: str) -> None:
    args = ["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=[10,30]", override]
    with pytest.raises(ConfigError, match="CLUSTERFIT|EXPERIMENT") as err:
        config_from_args(args)
    assert needle in str(err.value)


def test_a_sweep_shares_pretrain_and_extract_and_has_a_folder_per_k() -> None:
    cfg = config_from_args(
        ["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=[10,30]", "config.EVALUATE.BASELINES=[supervised]"]
    )
    assert step_folders(cfg, "pretrain") == ["pretrain"]
    assert step_folders(cfg, "cluster") == ["clusters/res5-k10", "clusters/res5-k30"]
    assert step_folders(cfg, "train") == ["train-k10", "train-k30", "supervised"]
    plain = config_from_args(["config=quickstart"])
    assert step_folders(plain, "train") == ["train"] and step_folders(plain, "cluster") == ["clusters/res5-k100"]
    # k-means of one K does not depend on which other K the sweep has: its clusters are reused.
    parts: dict = {}
    k10 = config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=10"])
    assert cluster_step.fingerprint(cfg.with_num_clusters(10), parts) == cluster_step.fingerprint(k10, parts)
    assert cluster_step.fingerprint(cfg.with_num_clusters(30), parts) != cluster_step.fingerprint(k10, parts)


def test_one_seed_per_root_and_the_single_step_commands_refuse_seeds(tmp_path: Path) -> None:
    cfg = config_from_args(
        ["config=quickstart", f"config.EXPERIMENT.ROOT={tmp_path.as_uri()}", "config.EXPERIMENT.SEEDS=[3,4]"]
    )
    one = cfg.with_seed(4)
    assert (one.EXPERIMENT.SEED, one.EXPERIMENT.SEEDS, one.EXPERIMENT.root_uri) == (
        4,
        [],
        f"{tmp_path.as_uri()}/seed-4",
    )
    result = cli("train", "config=quickstart", "config.EXPERIMENT.SEEDS=[3,4]")
    assert (
        result.returncode == 2
        and "EXPERIMENT.SEEDS=[3, 4]: `clusterfit run` runs the steps once per seed" in error_of(result)
    )


def seed_run(n: int, ours_right: int, theirs_right: int, upper_right: int) -> dict:
    """One seed's metrics.json: start, ClusterFit and supervised rows, with the comparison `evaluate` makes."""
    rows = [
        row("start", correct_vector(n, range(theirs_right)), correct_vector(n, range(theirs_right)), []),
        row("clusterfit", correct_vector(n, range(ours_right)), correct_vector(n, range(ours_right)), []),
        row("supervised", correct_vector(n, range(upper_right)), correct_vector(n, range(upper_right)), []),
    ]
    return {"rows": rows, "comparison": compare(rows, n), "n_test": n}


def test_seeds_combine_by_stouffer_and_a_seed_of_the_other_sign_keeps_it_within_noise() -> None:
    n = 1000
    steady = [seed_run(n, 720, 700, 800), seed_run(n, 725, 700, 810), seed_run(n, 715, 700, 790)]
    knn = {c["metric"]: c for c in combine_seeds(steady)}["knn_top1"]
    # Each seed: ClusterFit right on a superset of start's images, so McNemar's b = gain, c = 0.
    z = [
        NormalDist().inv_cdf(1 - c["p_value"] / 2) for s in steady for c in s["comparison"] if c["metric"] == "knn_top1"
    ]
    expected_p = 2 * (1 - NormalDist().cdf(sum(z) / math.sqrt(3)))
    assert knn["p_value"] == pytest.approx(expected_p) and knn["verdict"] == "better" and knn["same_sign"]
    assert knn["deltas"] == pytest.approx([2.0, 2.5, 1.5]) and knn["delta_mean"] == pytest.approx(2.0)
    assert knn["delta_std"] == pytest.approx(0.5) and knn["seeds"] == 3
    assert knn["supervised_mean"] == pytest.approx(80.0) and knn["gap_closed"] == pytest.approx(2.0 / 10.0)
    # One seed going the other way: the combined p may stay small, the verdict does not.
    mixed = [seed_run(n, 760, 700, 800), seed_run(n, 760, 700, 800), seed_run(n, 690, 700, 800)]
    knn = {c["metric"]: c for c in combine_seeds(mixed)}["knn_top1"]
    assert knn["p_value"] < 0.05 and not knn["same_sign"] and knn["verdict"] == "within noise"
    worse = [seed_run(n, 680, 700, 800)] * 3
    assert {c["metric"]: c for c in combine_seeds(worse)}["knn_top1"]["verdict"] == "worse"


def test_a_bootstrap_p_of_zero_counts_as_one_over_its_resamples() -> None:
    base = {"metric": "m", "layer": "l", "shots": 1, "reference": "start", "test": "paired bootstrap"}
    seeds = [
        {
            "rows": [],
            "comparison": [
                {**base, "p_value": 0.0, "resamples": 1000, "delta": 5.0, "clusterfit": 60.0, "reference_value": 55.0}
            ],
        }
    ]
    combined = combine_seeds(seeds)[0]
    assert combined["p_value"] == pytest.approx(0.001, rel=1e-6)  # one seed: Stouffer is the seed's own (floored) p


def test_mean_rows_average_every_metric_over_seeds() -> None:
    runs = [seed_run(100, 72, 70, 80), seed_run(100, 74, 70, 82)]
    rows = {r["model"]: r for r in mean_rows(runs)}
    assert rows["clusterfit"]["knn_top1"] == pytest.approx(73.0) and rows["clusterfit"]["seeds"] == 2
    assert rows["clusterfit"]["std"]["knn_top1"] == pytest.approx(np.std([72, 74], ddof=1))
    assert rows["start"]["std"]["linear_top1"] == 0.0


@pytest.mark.slow
def test_fashion_mnist_with_seeds_a_k_sweep_and_the_supervised_bound(tmp_path: Path) -> None:
    # The recipe on a small slice: 2 seeds x (pretrain, extract, 2 K, 2 trains + supervised, evaluate), a summary.
    root = tmp_path / "fm"
    args = [
        "config=fashion-mnist",
        f"config.EXPERIMENT.ROOT={root.as_uri()}",
        "config.EXPERIMENT.SEEDS=[0,1]",
        "config.CLUSTERFIT.NUM_CLUSTERS=[10,20]",
        "config.DATA.TRAIN.DATA_LIMIT=200",
        "config.DATA.TEST.DATA_LIMIT=100",
        "config.PRETRAIN.OPTIMIZER.NUM_EPOCHS=1",
        "config.OPTIMIZER.NUM_EPOCHS=1",
        "config.EVALUATE.LINEAR_EPOCHS=2",
        "config.EVALUATE.LOW_SHOT=[1]",
        "config.EVALUATE.LOW_SHOT_DRAWS=3",
        "config.EVALUATE.LAYERS=[res5avg]",
    ]
    first = cli("run", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    for seed in (0, 1):
        for folder in (
            "pretrain",
            "clusters/res5-k10",
            "clusters/res5-k20",
            "train-k10",
            "train-k20",
            "supervised",
            "eval",
        ):
            assert (root / f"seed-{seed}" / folder / "_SUCCESS.json").is_file(), (seed, folder)
        metrics = json.loads((root / f"seed-{seed}/eval/metrics.json").read_text())
        assert [r["model"] for r in metrics["rows"]] == [
            "pixels",
            "random",
            "start",
            "clusterfit-k10",
            "clusterfit-k20",
            "supervised",
        ]
        assert [s["k"] for s in metrics["sweep"]] == [10, 20]
        assert {c["model"] for c in metrics["comparison"]} == {"clusterfit-k10", "clusterfit-k20"}
    # What the steps wrote loads in VISSL as its own checkpoints do (the layout VISSL reads, every tensor named).
    for folder, classes in (("pretrain", 4), ("train-k10", 10), ("train-k20", 20), ("supervised", 10)):
        ckpt = torch.load(root / f"seed-1/{folder}/final.pt", map_location="cpu", weights_only=True)
        assert set(vissl_init_names(ckpt)) == vissl_resnet_names("resnet18", classes), folder
    pretrain = json.loads((root / "seed-0/pretrain/_SUCCESS.json").read_text())
    assert pretrain["config"]["EXPERIMENT"]["SEED"] == 0 and not (root / "pretrain").exists()  # per seed, once
    summary = json.loads((root / "summary/metrics.json").read_text())
    assert summary["seeds"] == [0, 1] and all(r["seeds"] == 2 for r in summary["rows"])
    assert len(summary["comparison"]) == 2 * 3  # 2 K x (kNN, 1-shot, linear) on res5avg
    assert all(c["seeds"] == 2 and len(c["deltas"]) == 2 for c in summary["comparison"])
    assert f"Report: {(root / 'summary/report.html').as_uri()}" in first.stdout
    assert "(over 2 seeds)" in first.stdout and "ClusterFit K=20" in first.stdout
    page = view(root / "summary/report.html")
    assert page.broken_images == [] and [src for src, _, _ in page.images] == ["k_sweep.png"]
    assert "K sweep (res5avg)" in page.headings
    table = next(t for t in page.tables if t[0][:3] == ["model", "layer", "dim"])
    assert [r[0] for r in table[1:]] == ["pixels", "random", "start", "clusterfit-k10", "clusterfit-k20", "supervised"]
    assert all(" ± " in cell for r in table[1:] for cell in r[3:])
    seed_page = view(root / "seed-1/eval/report.html")
    assert seed_page.broken_images == [] and "k_sweep.png" in [src for src, _, _ in seed_page.images]
    # A rerun does nothing, the summary included.
    again = cli("run", *args)
    assert again.returncode == 0 and "Nothing to do" in again.stdout, again.stdout[-2000:]
