"""Evaluation's pieces: low-shot subsets, the paired test of a comparison, the checks before a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clusterfit.config import ConfigError
from clusterfit.probes import (
    compare,
    knn_correct,
    low_shot_subsets,
    mcnemar,
    pack_correct,
    seed_spread,
    top1,
    unpack_correct,
)
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
    assert top1(knn_correct(x[one_shot], wrong[one_shot], x, y, k=20, temperature=0.07)) < 5.0
    assert top1(knn_correct(x, wrong, x, y, k=20, temperature=0.07)) > 90.0


def correct_vector(n: int, right: range | list[int]) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    out[list(right)] = True
    return out


def row(model: str, knn: np.ndarray, linear: np.ndarray, per_draw: list[np.ndarray]) -> dict:
    """A metrics row as `measure` writes it, from per-image correctness (bool (n_test,) each)."""
    draws = [100.0 * float(d.mean()) for d in per_draw]
    out: dict[str, Any] = {
        "model": model,
        "layer": "res5avg",
        "dim": 4,
        "knn_top1": 100.0 * float(knn.mean()),
        "linear_top1": 100.0 * float(linear.mean()),
        "low_shot": {},
        "correct": {"knn_top1": pack_correct(knn), "linear_top1": pack_correct(linear)},
    }
    if per_draw:
        out["low_shot"] = {"10": {"top1": float(np.mean(draws)), "std": float(np.std(draws)), "per_draw": draws}}
        out["correct"]["knn_10shot_top1"] = [pack_correct(d) for d in per_draw]
    return out


def test_mcnemar_mid_p_matches_the_binomial_tail_on_a_constructed_case() -> None:
    # 100 test images: both right on 80, only ours on 10, only theirs on 2, both wrong on 8.
    ours = correct_vector(100, [*range(80), *range(80, 90)])
    theirs = correct_vector(100, [*range(80), 90, 91])
    test = mcnemar(ours, theirs)
    assert (test["b"], test["c"]) == (10, 2)
    # X ~ Binomial(12, 1/2): exact p = 2 P(X <= 2) = 2 (1 + 12 + 66) / 4096; mid-p takes half of P(X = 2) = 66/4096.
    assert test["exact_p"] == pytest.approx(158 / 4096)
    assert test["p_value"] == pytest.approx(92 / 4096)
    assert mcnemar(theirs, ours)["p_value"] == pytest.approx(92 / 4096)  # symmetric
    assert mcnemar(correct_vector(20, range(5)), correct_vector(20, range(5, 10)))["p_value"] == pytest.approx(1.0)
    assert mcnemar(ours, ours)["p_value"] == 1.0  # no discordant pair: no evidence either way


def test_correctness_survives_the_json_round_trip_bit_for_bit() -> None:
    flags = np.random.default_rng(0).random(1001) < 0.3
    np.testing.assert_array_equal(unpack_correct(json.loads(json.dumps(pack_correct(flags))), 1001), flags)


def test_a_gain_on_the_same_images_is_real_even_where_two_binomial_errors_would_call_it_noise() -> None:
    n = 1000
    theirs = correct_vector(n, range(900))
    superset = correct_vector(n, range(920))  # +2 points: right on 20 more images, wrong on none they got right
    # +2 points as 100 images gained and 80 lost: the same difference, no longer consistent (b=100, c=80: p ~ 0.16).
    churn = correct_vector(n, [*range(40), *range(120, 1000)])
    assert churn.sum() == 920
    draws = [theirs] * 3
    for ours, verdict in ((superset, "better"), (churn, "within noise")):
        rows = [row("start", theirs, theirs, draws), row("clusterfit", ours, ours, draws)]
        by_metric = {c["metric"]: c for c in compare(rows, n)}
        for metric in ("knn_top1", "linear_top1"):
            c = by_metric[metric]
            assert c["delta"] == pytest.approx(2.0) and c["verdict"] == verdict, c
            assert c["test"] == "McNemar mid-p"
    rows = [row("start", superset, theirs, draws), row("clusterfit", theirs, theirs, draws)]
    worse = {c["metric"]: c for c in compare(rows, n)}["knn_top1"]
    assert worse["verdict"] == "worse" and worse["p_value"] < 1e-4 and worse["delta"] == pytest.approx(-2.0)


def test_a_low_shot_verdict_is_a_paired_bootstrap_over_images_and_draws() -> None:
    n, starts = 4000, (0, 100, 200, 300, 400)
    base = [correct_vector(n, range(s, s + 1400)) for s in starts]  # 35 % on every draw
    steady = [correct_vector(n, range(s, s + 1640)) for s in starts]  # +6 points on every draw
    gains = [1200, -720, 1000, -800, 520]  # +6 points on average, but not consistently
    erratic = [correct_vector(n, range(s, s + 1400 + g)) for s, g in zip(starts, gains, strict=True)]
    ones = correct_vector(n, range(n))
    for per_draw, verdict in ((steady, "better"), (erratic, "within noise")):
        result = compare([row("start", ones, ones, base), row("clusterfit", ones, ones, per_draw)], n)
        by_metric = {c["metric"]: c for c in result}
        assert sorted(by_metric) == ["knn_10shot_top1", "knn_top1", "linear_top1"]
        low = by_metric["knn_10shot_top1"]
        assert low["delta"] == pytest.approx(6.0) and low["verdict"] == verdict and low["shots"] == 10, low
        assert low["test"] == "paired bootstrap"
        assert by_metric["knn_top1"]["verdict"] == "within noise"  # identical: no discordant image


def test_seed_spread_is_the_mean_and_std_of_per_seed_results() -> None:
    n = 100
    per_seed = []
    for ours_right, theirs_right in ((50, 40), (52, 40), (54, 43)):
        rows = [
            row("start", correct_vector(n, range(theirs_right)), correct_vector(n, range(10)), []),
            row("clusterfit", correct_vector(n, range(ours_right)), correct_vector(n, range(10)), []),
        ]
        per_seed.append({"rows": rows, "n_test": n})
    spread = {s["metric"]: s for s in seed_spread(per_seed)}
    knn = spread["knn_top1"]
    assert knn["seeds"] == 3 and knn["layer"] == "res5avg"
    assert knn["clusterfit_mean"] == pytest.approx(52.0) and knn["clusterfit_std"] == pytest.approx(2.0)
    assert knn["delta_mean"] == pytest.approx(11.0) and knn["delta_std"] == pytest.approx(np.std([10, 12, 11], ddof=1))
    assert spread["linear_top1"]["delta_std"] == 0.0


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
