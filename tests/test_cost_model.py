"""The README's "Cost at scale" is what bench/cost_model.py computes from bench/measured/*.json."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("cost_model", ROOT / "bench" / "cost_model.py")
assert spec and spec.loader
cost_model = importlib.util.module_from_spec(spec)
sys.modules["cost_model"] = cost_model  # dataclasses look their module up there
spec.loader.exec_module(cost_model)


def test_the_readme_section_is_the_one_computed_from_the_measured_json() -> None:
    readme = (ROOT / "README.md").read_text()
    assert readme.count(cost_model.BEGIN) == readme.count(cost_model.END) == 1
    inside = readme.split(cost_model.BEGIN)[1].split(cost_model.END)[0].strip()
    assert inside == cost_model.section(), "README.md drifted from bench/measured/: python bench/cost_model.py --write"


def test_every_rate_comes_from_a_committed_benchmark_file() -> None:
    for rate in cost_model.cpu_rates().values():
        source = rate.source.split(":")[0]
        assert (cost_model.MEASURED / source).is_file(), rate
        assert rate.value > 1e9, rate  # FLOP/s of a real machine, not a placeholder


def test_the_work_scales_with_n_except_the_capped_k_means_sample() -> None:
    small, large = ({w.step: w for w in cost_model.work(n)} for n in (10**6, 10**9))
    for step in ("extract", "assignment", "training, per epoch"):
        assert large[step].flop == pytest.approx(1000 * small[step].flop)
    sample = cost_model.K * cost_model.MAX_POINTS_PER_CENTROID  # 4,096,000 points at most
    assert large["k-means training"].flop == pytest.approx(small["k-means training"].flop * sample / 10**6)
    assert large["assignment"].bytes_read == 10**9 * 2048 * 4  # 8.2 TB of float32 features
    assert cost_model.work(10**9, bytes_per_value=2)[2].bytes_read == 10**9 * 2048 * 2
    # ResNet-50 at 224 px: 4.1 G multiply-adds a forward pass, as the literature counts it.
    assert cost_model.forward_flop("resnet50", 224, 0) == pytest.approx(2 * 4.1e9, rel=0.02)


def test_a_gpu_run_copied_beside_the_others_fills_the_h200_column(tmp_path: Path) -> None:
    measured = tmp_path / "measured"
    shutil.copytree(cost_model.MEASURED, measured)
    (measured / "gpu.json").unlink(missing_ok=True)
    assert "| H200 | not measured" in cost_model.section(measured)
    rows = [
        {"benchmark": "extract resnet50 224px", "setting": "CPU JPEG decode (PIL, workers) + bf16", "figure": 3000.0},
        {"benchmark": "k-means N=1281167 D=2048 K=16000", "setting": "faiss-gpu", "tflops": 40.0},
        {"benchmark": "train resnet50 224px", "setting": "bf16 AMP, channels_last", "figure": 2500.0},
    ]
    (measured / "gpu.json").write_text(json.dumps({"rows": rows}))
    text = cost_model.section(measured)
    assert "not measured" not in text
    rate = cost_model.gpu_rates(measured)["kmeans"].value
    assert rate == 40e12
    # 1 M images: 2 x 1e6 x 16000 x 2048 FLOP at 40 TFLOP/s = 1.64 s of assignment.
    assert "65.5 TFLOP / 40 TFLOP/s = 1.64 s" in text
