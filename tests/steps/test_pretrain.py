"""RotNet's inputs: all four rotations per image (ours) or VISSL's one random rotation, and its transforms."""

from __future__ import annotations

from pathlib import Path

import torch

from clusterfit.config import config_from_args
from clusterfit.data import build_dataset, train_transform
from clusterfit.steps import pretrain
from tests.conftest import tiny_config


def names(transform: object) -> list[str]:
    return [type(step).__name__ for step in transform.transforms]  # type: ignore[attr-defined]


def test_one_random_rotation_gives_each_image_one_labelled_turn(tmp_path: Path) -> None:
    # Full-frame crops, no jitter, no flip: the only change left is the turn, so the oracle is
    # torch.rot90 of the unturned image by the label.
    cfg = tiny_config(
        tmp_path,
        **{
            "PRETRAIN.ROTATIONS": "one_random",
            "PRETRAIN.COLOR_JITTER": "[0,0,0,0]",
            "DATA.TRANSFORMS.TRAIN_MIN_SCALE": 1.0,
            "DATA.TRAIN.DATA_LIMIT": 48,
        },
    )
    dataset, batch_fn = pretrain.rotnet_data(cfg)
    plain = build_dataset(cfg, "TRAIN", pretrain.pretrain_transform(cfg))
    torch.manual_seed(0)
    labels = []
    for index in range(len(dataset)):
        image, label, problem = dataset[index]
        assert problem == ""
        expected = torch.rot90(plain[index][0], label, dims=(1, 2))
        assert torch.allclose(image, expected, atol=1e-6), (index, label)
        labels.append(label)
    assert set(labels) == {0, 1, 2, 3} and len(dataset) == 48
    images, targets = torch.zeros(5, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0])
    assert batch_fn(images, targets)[0] is images and batch_fn(images, targets)[1] is targets  # one input per image


def test_all4_shows_every_image_at_four_rotations(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, **{"DATA.TRAIN.DATA_LIMIT": 8})
    assert cfg.PRETRAIN.ROTATIONS == "all4"
    dataset, batch_fn = pretrain.rotnet_data(cfg)
    inputs, labels = batch_fn(torch.stack([dataset[i][0] for i in range(4)]), torch.zeros(4))
    assert inputs.shape[0] == 16 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4


def test_pretrain_colour_jitter_replaces_the_data_transforms_jitter(tmp_path: Path) -> None:
    inherit = tiny_config(tmp_path)
    assert inherit.PRETRAIN.COLOR_JITTER is None
    assert names(pretrain.pretrain_transform(inherit)) == names(train_transform(inherit.DATA.TRANSFORMS))
    assert "ColorJitter" in names(pretrain.pretrain_transform(inherit))
    off = tiny_config(tmp_path, **{"PRETRAIN.COLOR_JITTER": "[0,0,0,0]"})
    assert "ColorJitter" not in names(pretrain.pretrain_transform(off))
    assert "ColorJitter" in names(train_transform(off.DATA.TRANSFORMS))  # step 2 keeps its jitter


def test_rotnet_config_carries_vissls_augmentation() -> None:
    # VISSL's rotnet_8gpu_resnet: ImgRotatePil (one rotation per image), RandomResizedCrop 224, flip,
    # ToTensor, Normalize; no colour jitter.
    cfg = config_from_args(["config=pretrain/rotnet/rotnet_8gpu_resnet"])
    assert cfg.PRETRAIN.ROTATIONS == "one_random"
    transform = pretrain.pretrain_transform(cfg)
    assert names(transform) == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    crop = transform.transforms[0]  # type: ignore[attr-defined]
    assert crop.size == (224, 224) and crop.scale == (0.08, 1.0)
