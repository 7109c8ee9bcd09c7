"""The extract step's forward: bf16 autocast and channels_last as training does, only on CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clusterfit.artifacts.lineage import StartWeights
from clusterfit.steps import extract
from tests.conftest import tiny_config
from tests.steps.helpers import features_from_disk


def test_extract_asks_for_autocast_only_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []
    real = extract.forward_features

    def spy(model: Any, images: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append({"device": images.device.type, "fmt": args[2] if len(args) > 2 else kwargs.get("fmt"), **kwargs})
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(extract, "forward_features", spy)
    cfg = tiny_config(
        tmp_path / "exp",
        **{"PIPELINE.STEPS": "[extract]", "DATA.TRAIN.DATA_LIMIT": 64, "EXTRACT.PARTITIONS": "[TRAIN]"},
    )
    assert cfg.MODEL.AMP_PARAMS.USE_AMP and cfg.MODEL.CHANNELS_LAST
    extract.run(cfg)
    assert calls and all(c["device"] == "cpu" for c in calls)
    assert all(c["amp"] is False for c in calls)  # USE_AMP is true, but this is CPU
    assert all(c["fmt"] == torch.channels_last for c in calls)
    _, features = features_from_disk(tmp_path / "exp", "train", cfg.CLUSTERFIT.FEATURES.LAYER_NAME)
    assert features.dtype == np.float32 and len(features) == 64


def test_the_precision_is_part_of_the_chunks_identity(tmp_path: Path) -> None:
    # A CUDA extraction resumed on a CPU (or with USE_AMP switched) must redo its chunks, not mix
    # bf16 parts with fp32 ones in one published folder.
    cfg = tiny_config(tmp_path / "exp")
    start = StartWeights("", None, "")
    layers = [cfg.CLUSTERFIT.FEATURES.LAYER_NAME]
    bf16 = extract.fingerprint(cfg, "TRAIN", start, layers, amp=True)
    assert bf16 == extract.fingerprint(cfg, "TRAIN", start, layers, amp=True)
    assert bf16 != extract.fingerprint(cfg, "TRAIN", start, layers, amp=False)
