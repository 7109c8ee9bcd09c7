"""VISSL's linear benchmark (`EVALUATE.PROTOCOL: vissl_linear`): one BN + Linear head per layer on the
frozen trunk's pooled maps, trained together on augmented images, as VISSL's
`eval_resnet_8gpu_transfer_in1k_linear` does; what `probes` is to extracted features, this is to the trunk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clusterfit.config.schema import VisslLinearConfig
from clusterfit.training import build_optimizer, lr_at

# Side of each layer's map for a ResNet at 224 pixels, where VISSL's pooling table was set.
VISSL_MAP_SIZE = {"conv1": 112, "res2": 56, "res3": 28, "res4": 14, "res5": 7}


def pool_op(layer: str, size: int, pooling: Mapping[Any, Sequence[int]]) -> nn.Module:
    """VISSL's AvgPool2d(kernel, stride, padding) for `layer` on a (B, C, size, size) map; on a map smaller than
    the kernel, adaptive average pooling to the grid VISSL's op gives at 224 pixels; Identity for a layer without
    an entry (res5avg)."""
    if layer not in pooling:
        return nn.Identity()
    kernel, stride, padding = pooling[layer]
    if size + 2 * padding >= kernel:
        return nn.AvgPool2d(kernel, stride, padding)
    grid = (VISSL_MAP_SIZE.get(layer, kernel) + 2 * padding - kernel) // stride + 1
    return nn.AdaptiveAvgPool2d(max(1, grid))


class LinearEvalHead(nn.Module):
    """VISSL's `eval_mlp`: pool, BatchNorm2d over the channels, flatten, one Linear. (B, C, H, W) or (B, C) in,
    (B, classes) logits out."""

    def __init__(self, pool: nn.Module, channels: int, dim: int, num_classes: int) -> None:
        super().__init__()
        self.pool = pool
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.dim() == 2:
            feature = feature[:, :, None, None]
        return self.fc(torch.flatten(self.bn(self.pool(feature)), 1))


def linear_eval_heads(
    taps: dict[str, torch.Tensor], pooling: Mapping[Any, Sequence[int]], num_classes: int
) -> nn.ModuleDict:
    """One LinearEvalHead per tapped layer, sized from one batch of the trunk's features."""
    heads = nn.ModuleDict()
    for layer, feature in taps.items():
        pool = pool_op(layer, int(feature.shape[-1]), pooling) if feature.dim() == 4 else nn.Identity()
        dim = int(torch.flatten(pool(feature[:1].float().cpu()), 1).shape[1])
        heads[layer] = LinearEvalHead(pool, int(feature.shape[1]), dim, num_classes)
    return heads


Batches = Iterable[tuple[Any, ...]]  # (images, targets) or, from a LabelledDataset, (images, targets, problems)


def train_linear_eval(
    trunk: Any,
    layers: Sequence[str],
    train: Batches,
    test: Batches,
    num_classes: int,
    v: VisslLinearConfig,
    device: torch.device,
) -> dict[str, tuple[int, np.ndarray]]:
    """{layer: (head input dim, bool (n_test,) correctness)} of VISSL's benchmark: the frozen trunk (eval mode,
    `trunk.taps(images, layers)`) feeds one head per layer; the heads train together on the sum of their
    cross-entropies (VISSL's cross_entropy_multiple_output_single_target), the LR set once per epoch."""
    trunk.eval().requires_grad_(False)
    heads: nn.ModuleDict | None = None
    optimizer: torch.optim.Optimizer | None = None
    for epoch in range(v.OPTIMIZER.NUM_EPOCHS):
        lr = lr_at(epoch, v.OPTIMIZER, v.BATCH_SIZE, 1)
        for images, targets, *_ in train:
            with torch.no_grad():
                taps = trunk.taps(images.to(device), layers)
            if heads is None or optimizer is None:  # sized from the first batch's maps
                heads = linear_eval_heads(taps, v.POOLING, num_classes).to(device)
                optimizer = build_optimizer(heads, v.OPTIMIZER)
            heads.train()
            for group in optimizer.param_groups:
                group["lr"] = lr
            labels = targets.to(device)
            loss = sum(F.cross_entropy(heads[layer](taps[layer]), labels) for layer in layers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    assert heads is not None, "VISSL_LINEAR: no training batch"
    heads.eval()
    predicted: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
    truth = []
    with torch.no_grad():
        for images, targets, *_ in test:
            taps = trunk.taps(images.to(device), layers)
            for layer in layers:
                predicted[layer].append(heads[layer](taps[layer]).argmax(1).cpu().numpy())
            truth.append(targets.numpy())
    y_test = np.concatenate(truth)
    return {layer: (head_dim(heads[layer]), np.concatenate(predicted[layer]) == y_test) for layer in layers}


def head_dim(head: nn.Module) -> int:
    """The input width of a LinearEvalHead's Linear (VISSL's `dims[0]`)."""
    assert isinstance(head, LinearEvalHead)
    return head.fc.in_features
