"""Step 0 (optional): RotNet from scratch, so a run needs no downloaded weights.

    clusterfit pretrain config=quickstart
    clusterfit pretrain config=quickstart config.PRETRAIN.OPTIMIZER.NUM_EPOCHS=2

Each image is shown at 0, 90, 180 and 270 degrees and a 4-way head learns which (Gidaris et al.,
ICLR 2018): all four in the same batch (PRETRAIN.ROTATIONS=all4), or, as VISSL's RotNet recipe,
one rotation drawn per image before the crop (one_random). Writes `pretrain/final.pt`, a
checkpoint that MODEL.WEIGHTS_INIT loads with its defaults (the state dict under
`classy_state_dict`, VISSL's parameter names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from clusterfit import artifacts, distributed
from clusterfit.artifacts.layout import PRETRAIN
from clusterfit.config import Config
from clusterfit.data import ImageDataset, build_source, dataset_identity, train_transform
from clusterfit.models import build_network
from clusterfit.storage import open_store
from clusterfit.training import BatchFn, FitJob, FitResult, LabelledDataset, LabelledImages, fit

NUM_ROTATIONS = 4
# k quarter turns counter-clockwise, the direction of torch.rot90 (and of VISSL's TF.rotate by k x 90).
_TRANSPOSE = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def rotate_batch(images: torch.Tensor, _: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, H, W) -> (4B, C, H, W) rotated by 0/90/180/270 degrees, and labels 0..3."""
    rotated = torch.cat([torch.rot90(images, r, dims=(2, 3)) for r in range(NUM_ROTATIONS)])
    labels = torch.arange(NUM_ROTATIONS, device=images.device).repeat_interleave(len(images))
    return rotated, labels


def keep_batch(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """one_random: the images arrive rotated and labelled by the dataset."""
    return images, labels


class QuarterTurn:
    """A PIL image turned k x 90 degrees counter-clockwise, losslessly (a non-square image swaps its sides)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(_TRANSPOSE[self.k]) if self.k else image


class OneRandomRotation(torch.utils.data.Dataset[tuple[torch.Tensor, int, str]]):
    """VISSL's ImgRotatePil: each access draws one rotation k, turns the image before the training
    transform (crop, flip, ...) and labels it k. `per_rotation[k]` is the dataset with turn k in front."""

    def __init__(self, per_rotation: list[ImageDataset]) -> None:
        self.per_rotation = per_rotation

    def __len__(self) -> int:
        return len(self.per_rotation[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        k = int(torch.randint(NUM_ROTATIONS, ()))
        image, _, problem = self.per_rotation[k][index]
        return image, k, problem


def pretrain_transform(cfg: Config) -> Callable[[Image.Image], Any]:
    """DATA.TRANSFORMS' training transform, with PRETRAIN.COLOR_JITTER in place of its jitter when set."""
    transforms = cfg.DATA.TRANSFORMS
    if cfg.PRETRAIN.COLOR_JITTER is not None:
        transforms = transforms.model_copy(update={"COLOR_JITTER": cfg.PRETRAIN.COLOR_JITTER})
    return train_transform(transforms)


def rotnet_data(cfg: Config) -> tuple[LabelledImages, BatchFn]:
    """The (image, target) dataset and the batch function for PRETRAIN.ROTATIONS."""
    source, transform = build_source(cfg, "TRAIN"), pretrain_transform(cfg)
    if cfg.PRETRAIN.ROTATIONS == "all4":
        images = ImageDataset(source, transform, cfg.DATA.ON_BAD_IMAGE)
        return LabelledDataset(images, [0] * len(images)), rotate_batch
    per_rotation = [
        ImageDataset(source, T.Compose([QuarterTurn(k), transform]), cfg.DATA.ON_BAD_IMAGE)
        for k in range(NUM_ROTATIONS)
    ]
    return OneRandomRotation(per_rotation), keep_batch


def fingerprint(cfg: Config) -> str:
    tree = {
        "trunk": cfg.MODEL.TRUNK.model_dump(),
        "pretrain": cfg.PRETRAIN.model_dump(mode="json"),
        "data": dataset_identity(cfg, "TRAIN"),
        "transforms": cfg.DATA.TRANSFORMS.model_dump(),
        "seed": cfg.EXPERIMENT.SEED,
        "world_size": cfg.DISTRIBUTED.world_size,
    }
    return artifacts.fingerprint("pretrain", tree, {})


def run(cfg: Config) -> FitResult:
    dist = distributed.init_distributed(cfg.DISTRIBUTED.BACKEND, cfg.DISTRIBUTED.TIMEOUT_S)
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    fp = fingerprint(cfg)
    if artifacts.skip_if_published(store, PRETRAIN, fp, "pretrain"):
        return FitResult(PRETRAIN, skipped=True)
    # The images (each at four rotations per step, or at one drawn per image) and a 4-way head.
    dataset, batch_fn = rotnet_data(cfg)
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    model = build_network(cfg.MODEL.TRUNK, [NUM_ROTATIONS])
    # Training: resumed from the latest checkpoint, published as pretrain/final.pt.
    job = FitJob(
        step="pretrain",
        folder=PRETRAIN,
        model=model,
        dataset=dataset,
        batch_fn=batch_fn,
        optimizer_cfg=cfg.PRETRAIN.OPTIMIZER,
        batch_size=cfg.PRETRAIN.BATCHSIZE_PER_REPLICA,
        fingerprint=fp,
        inputs={},
        extra={"method": "rotnet", "rotations": cfg.PRETRAIN.ROTATIONS, "num_images": len(dataset)},
    )
    return fit(cfg, store, job, dist)
