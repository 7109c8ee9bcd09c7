"""Evaluation's pieces: low-shot subsets, the noise band of a comparison, the checks before a run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from clusterfit.config import ConfigError
from clusterfit.probes import compare, knn_top1, low_shot_subsets
from clusterfit.steps.evaluate import pixel_features
from tests.conftest import cli, tiny_overrides


def test_low_shot_subsets_hold_n_images_of_every_class_and_repeat_with_the_seed() -> None:
    y = np.repeat(np.arange(5), [12, 7, 30, 5, 9])
    subsets = low_shot_subsets(y, [1, 5], draws=6, seed=3)
    assert sorted(subsets) == [1, 5]
    for n, sets in subsets.items():
        assert len(sets) == 6
        for s in sets:
            assert np.array_equal(np.bincount(y[s], minlength=5), np.full(5, n)) and len(np.unique(s)) == len(s)
    assert len({tuple(s) for s in subsets[5]}) > 1  # the draws differ from one another
    again = low_shot_subsets(y, [1, 5], draws=6, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(subsets[5], again[5], strict=True))
    other = low_shot_subsets(y, [5], draws=6, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(subsets[5], other[5], strict=True))


def test_low_shot_beyond_the_smallest_class_fails_naming_key_class_and_count() -> None:
    y = np.repeat(np.arange(4), [12, 3, 30, 2])
    with pytest.raises(
        ConfigError, match=r"EVALUATE.LOW_SHOT: 5 labelled images per class .* class 1 has 3 .*2 classes have fewer"
    ):
        low_shot_subsets(y, [1, 5], draws=2, seed=0)


def test_low_shot_knn_uses_only_the_subset_as_its_memory_bank() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 8)) * 4
    y = np.repeat(np.arange(3), 20)
    x = centers[y] + rng.normal(size=(60, 8))
    wrong = y.copy()
    wrong[[0, 20, 40]] = [1, 2, 0]  # the only images a 1-shot subset of indices {0, 20, 40} sees, mislabelled
    one_shot = np.array([0, 20, 40])
    assert knn_top1(x[one_shot], wrong[one_shot], x, y, k=20, temperature=0.07) < 5.0
    assert knn_top1(x, wrong, x, y, k=20, temperature=0.07) > 90.0


def row(model: str, knn: float, per_draw: list[float]) -> dict:
    return {
        "model": model,
        "layer": "res5avg",
        "dim": 4,
        "knn_top1": knn,
        "linear_top1": 90.0,
        "low_shot": {"10": {"top1": float(np.mean(per_draw)), "std": float(np.std(per_draw)), "per_draw": per_draw}},
    }


def test_a_low_shot_difference_counts_only_beyond_the_spread_of_its_paired_draws() -> None:
    start = [70.0, 80.0, 60.0, 75.0, 65.0]
    steady = [s + 6.0 for s in start]  # +6 on every subset
    erratic = [s + d for s, d in zip(start, [30.0, -18.0, 25.0, -20.0, 13.0], strict=True)]  # +6 on average
    n_test = 100_000  # the test set's binomial error all but vanishes: only the draws can make noise
    for per_draw, verdict in ((steady, "better"), (erratic, "within noise")):
        result = compare([row("start", 90.0, start), row("clusterfit", 90.0, per_draw)], n_test)
        by_metric = {c["metric"]: c for c in result}
        assert sorted(by_metric) == ["knn_10shot_top1", "knn_top1", "linear_top1"]
        low = by_metric["knn_10shot_top1"]
        assert low["delta"] == pytest.approx(6.0) and low["verdict"] == verdict and low["shots"] == 10, low
        assert by_metric["knn_top1"]["verdict"] == "within noise"


def test_the_binomial_band_alone_decides_full_data_metrics() -> None:
    small, large = (compare([row("start", 90.0, [50.0]), row("clusterfit", 93.0, [50.0])], n) for n in (360, 10_000))
    assert small[0]["metric"] == "knn_top1" and small[0]["verdict"] == "within noise"  # ±4.2 points on 360 images
    assert large[0]["verdict"] == "better" and large[0]["noise_2se"] == pytest.approx(0.79, abs=0.01)


def test_run_refuses_a_low_shot_count_the_data_cannot_give_before_any_step(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    proc = cli("run", *tiny_overrides(root), "config.DATA.TRAIN.DATA_LIMIT=100", "config.EVALUATE.LOW_SHOT=[1,40]")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "EVALUATE.LOW_SHOT: 40 labelled images per class asked for" in proc.stderr and "Traceback" not in proc.stderr
    assert not (root / "pretrain").exists()


def test_the_pixel_baseline_stays_small_at_any_image_size() -> None:
    small = torch.rand(3, 3, 16, 16)
    np.testing.assert_array_equal(
        pixel_features(small, 32), small.flatten(1).numpy()
    )  # at or under the size: untouched
    large = torch.rand(2, 3, 224, 160)
    pooled = pixel_features(large, 32)
    assert pooled.shape == (2, 3 * 32 * 32) and pooled.dtype == np.float32
    block = large[0, 1, 7 * 7 : 8 * 7, 5 * 5 : 6 * 5].mean()  # 224/32 = 7 rows, 160/32 = 5 columns per output pixel
    assert pooled[0].reshape(3, 32, 32)[1, 7, 5] == pytest.approx(float(block), rel=1e-5)
