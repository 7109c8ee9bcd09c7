"""Networks: a torchvision ResNet trunk with named feature taps, plus linear heads.

Parameter names follow VISSL's layout, so VISSL checkpoints and its APPEND_PREFIX advice apply:
the trunk's parameters are `trunk._feature_blocks.<torchvision name>` and the heads' are
`heads.<i>.weight/bias`.

Taps: `conv1` (after conv1-bn1-relu), `res2`..`res5` (after layer1..layer4, feature maps) and
`res5avg` (layer4 average-pooled and flattened: 2048-d for ResNet-50, VISSL's ClusterFit `res5`).
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from clusterfit.config import LAYERS

_BLOCKS = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}


class Trunk(nn.Module):
    def __init__(self, name: str, small_image_stem: bool = False) -> None:
        super().__init__()
        net = torchvision.models.get_model(name, weights=None)
        if small_image_stem:
            # 3x3 stride-1 stem and no max-pool: small images keep their spatial detail.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.out_dim: int = net.fc.in_features
        net.fc = nn.Identity()
        self._feature_blocks = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.taps(images, ["res5avg"])["res5avg"]

    def taps(self, images: torch.Tensor, layers: list[str]) -> dict[str, torch.Tensor]:
        """Features of the named layers in one pass, stopping after the deepest one requested."""
        unknown = set(layers) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown layer name(s) {sorted(unknown)}; valid: {list(LAYERS)}")
        net = self._feature_blocks
        deepest = max(LAYERS.index(name) for name in layers)
        out: dict[str, torch.Tensor] = {}
        x = net.relu(net.bn1(net.conv1(images)))
        if "conv1" in layers:
            out["conv1"] = x
        x = net.maxpool(x)
        for index, (tap, block) in enumerate(_BLOCKS.items(), start=1):
            if index > deepest:
                return out
            x = getattr(net, block)(x)
            if tap in layers:
                out[tap] = x
        if "res5avg" in layers:
            out["res5avg"] = torch.flatten(net.avgpool(x), 1)
        return out


class Network(nn.Module):
    """Trunk plus zero or more linear heads on `res5avg`."""

    def __init__(self, trunk_name: str, num_classes: list[int] | None = None, small_image_stem: bool = False) -> None:
        super().__init__()
        self.trunk = Trunk(trunk_name, small_image_stem)
        self.heads = nn.ModuleList(nn.Linear(self.trunk.out_dim, n) for n in (num_classes or []))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)
        return self.heads[0](features)


def pool_features(feature: torch.Tensor, pool_size: int) -> torch.Tensor:
    """(B, C, H, W) maps -> (B, C * s * s) by adaptive average pooling; (B, D) vectors unchanged."""
    if feature.dim() == 4:
        feature = F.adaptive_avg_pool2d(feature, pool_size)
    return torch.flatten(feature, 1)


def build_network(cfg_trunk: object, num_classes: list[int] | None = None) -> Network:
    return Network(cfg_trunk.NAME, num_classes, cfg_trunk.SMALL_IMAGE_STEM)  # type: ignore[attr-defined]


def memory_format(channels_last: bool) -> torch.memory_format:
    """MODEL.CHANNELS_LAST as a torch memory format."""
    return torch.channels_last if channels_last else torch.contiguous_format


def amp_enabled(use_amp: bool, device: torch.device) -> bool:
    """Whether to run under bf16 autocast: MODEL.AMP_PARAMS.USE_AMP on CUDA; never on CPU."""
    return use_amp and device.type == "cuda"


@torch.inference_mode()
def forward_features(
    model: Network,
    images: torch.Tensor,
    layers: list[str],
    pool_size: int,
    fmt: torch.memory_format = torch.contiguous_format,
    *,
    amp: bool = False,
) -> dict[str, np.ndarray]:
    """{layer: float32 (B, D)} for a batch; feature maps are average-pooled to pool_size.

    amp: the trunk runs under bf16 autocast on the images' device; pooling is done in float32.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        taps = model.trunk.taps(images.contiguous(memory_format=fmt), layers)
    return {name: pool_features(taps[name].float(), pool_size).cpu().numpy() for name in layers}
