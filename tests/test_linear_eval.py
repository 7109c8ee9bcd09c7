"""VISSL's linear benchmark heads: their shapes, pooling and defaults as VISSL's, and that they learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterfit.config.schema import EvaluateConfig
from clusterfit.linear_eval import LinearEvalHead, linear_eval_heads, pool_op, train_linear_eval
from clusterfit.models import Network

# VISSL's HEAD.PARAMS in eval_resnet_8gpu_transfer_in1k_linear.yaml: eval_mlp in_channels and dims[0] per layer.
VISSL_HEADS = {
    "conv1": (64, 9216),
    "res2": (256, 9216),
    "res3": (512, 8192),
    "res4": (1024, 9216),
    "res5": (2048, 8192),
    "res5avg": (2048, 2048),
}


def test_vissl_linear_heads_have_vissls_shapes_on_a_resnet50_at_224_pixels() -> None:
    trunk = Network("resnet50").trunk.eval()
    with torch.no_grad():
        taps = trunk.taps(torch.rand(2, 3, 224, 224), list(VISSL_HEADS))
    heads = linear_eval_heads(taps, EvaluateConfig().VISSL_LINEAR.POOLING, 10)
    for layer, (channels, dim) in VISSL_HEADS.items():
        head = heads[layer]
        assert isinstance(head, LinearEvalHead)
        assert (head.bn.num_features, head.fc.in_features, head.fc.out_features) == (channels, dim, 10), layer
        assert head(taps[layer]).shape == (2, 10)
    res4 = heads["res4"].pool
    assert isinstance(res4, nn.AvgPool2d) and (res4.kernel_size, res4.stride, res4.padding) == (8, 3, 0)


def test_a_map_smaller_than_vissls_kernel_is_pooled_to_the_grid_vissl_gets_at_224_pixels() -> None:
    pooling = EvaluateConfig().VISSL_LINEAR.POOLING
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    out = pool_op("res4", 4, pooling)(x)  # res4 of a 16-pixel digit is 4x4; VISSL's kernel is 8x8
    assert out.shape == (2, 3, 3, 3)  # VISSL's res4 grid: (14 - 8) / 3 + 1 = 3
    assert float(out[1, 2, 0, 0]) == pytest.approx(float(x[1, 2, 0:2, 0:2].mean()))  # window rows/cols [0, 2)
    assert float(out[1, 2, 2, 1]) == pytest.approx(float(x[1, 2, 2:4, 1:3].mean()))  # [2, 4) x [1, 3)
    assert isinstance(pool_op("res5avg", 1, pooling), nn.Identity)


def test_the_vissl_linear_defaults_are_vissls() -> None:
    v = EvaluateConfig().VISSL_LINEAR
    o = v.OPTIMIZER
    assert EvaluateConfig().PROTOCOL == "quick"
    assert (o.NUM_EPOCHS, o.BASE_LR, o.BASE_LR_BATCH_SIZE, o.MILESTONES, o.GAMMA) == (28, 0.01, 256, [8, 16, 24], 0.1)
    assert (o.MOMENTUM, o.NESTEROV, o.WEIGHT_DECAY, o.REGULARIZE_BN, o.REGULARIZE_BIAS) == (
        0.9,
        True,
        5e-4,
        False,
        True,
    )
    assert o.WARMUP_EPOCHS == 0 and v.BATCH_SIZE == 256


class MeanColour(nn.Module):
    """A stand-in trunk whose `res5avg` is each image's mean colour: what the classes below differ by."""

    def taps(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        return {"res5avg": images.mean((2, 3))}


def test_vissl_linear_heads_learn_separable_classes_with_vissls_recipe() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 3, generator=generator) * 3
    y = torch.arange(4).repeat(64)
    images = centres[y][:, :, None, None] + torch.randn(256, 3, 4, 4, generator=generator)
    batches = [(images[i : i + 32], y[i : i + 32]) for i in range(0, 256, 32)]
    v = EvaluateConfig().VISSL_LINEAR
    short = v.OPTIMIZER.model_copy(update={"NUM_EPOCHS": 4, "BASE_LR": 0.5, "MILESTONES": [3]})  # a few epochs
    v = v.model_copy(update={"BATCH_SIZE": 32, "OPTIMIZER": short})
    torch.manual_seed(0)
    dim, correct = train_linear_eval(MeanColour(), ["res5avg"], batches, batches[:2], 4, v, torch.device("cpu"))[
        "res5avg"
    ]
    assert dim == 3 and correct.shape == (64,) and correct.mean() > 0.9
