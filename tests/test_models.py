"""bf16 autocast in the feature forward: taken only on CUDA, and close to fp32 where it is taken."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clusterfit.models import Network, amp_enabled, forward_features


def test_autocast_is_enabled_only_on_cuda_and_only_when_asked() -> None:
    assert amp_enabled(True, torch.device("cuda")) is True
    assert amp_enabled(True, torch.device("cuda", 1)) is True
    assert amp_enabled(True, torch.device("cpu")) is False  # CPU: MODEL.AMP_PARAMS.USE_AMP is ignored
    assert amp_enabled(False, torch.device("cuda")) is False


def test_bf16_features_are_float32_and_agree_with_fp32() -> None:
    # The same forward on CPU with bf16 autocast: float32 output, rows nearly parallel to fp32's,
    # and not identical (so autocast did run in bf16).
    torch.manual_seed(0)
    model = Network("resnet18", small_image_stem=True).eval().to(memory_format=torch.channels_last)
    images = torch.randn(8, 3, 16, 16)
    layers = ["res4", "res5avg"]
    fp32 = forward_features(model, images, layers, 1, torch.channels_last)
    bf16 = forward_features(model, images, layers, 1, torch.channels_last, amp=True)
    for layer in layers:
        a, b = bf16[layer], fp32[layer]
        assert a.dtype == np.float32 and a.shape == b.shape
        cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        relative = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
        assert cosine.min() > 0.999, layer
        assert relative.max() < 0.05, layer
        assert not np.array_equal(a, b), layer
    assert amp_enabled(True, images.device) is False  # the extract step would not have asked for it here
    with pytest.raises(TypeError):
        forward_features(model, images, layers, 1, torch.channels_last, True)  # amp is keyword-only
