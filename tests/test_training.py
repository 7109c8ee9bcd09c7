"""The training recipe's pure pieces: LR schedule, weight-decay groups, epoch order, RotNet batches."""

from __future__ import annotations

import pytest
import torch

from clusterfit.config import OptimizerConfig
from clusterfit.models import Network
from clusterfit.steps.pretrain import rotate_batch
from clusterfit.training import epoch_batches, lr_at, param_groups, peak_lr

VISSL = OptimizerConfig()  # the ImageNet recipe's defaults


def test_lr_scales_with_global_batch_and_steps_down_at_milestones() -> None:
    assert peak_lr(VISSL, 256) == pytest.approx(0.1)
    assert peak_lr(VISSL, 1024) == pytest.approx(0.4)
    assert lr_at(0.0, VISSL, 256, num_nodes=1) == pytest.approx(0.1)  # no warm-up on one node
    assert lr_at(29.9, VISSL, 256, 1) == pytest.approx(0.1)
    assert lr_at(30.0, VISSL, 256, 1) == pytest.approx(0.01)
    assert lr_at(95.0, VISSL, 256, 1) == pytest.approx(1e-4)
    assert lr_at(104.0, VISSL, 256, 1) == pytest.approx(1e-5)


def test_warm_up_only_when_multi_node() -> None:
    assert lr_at(0.0, VISSL, 1024, num_nodes=4) < 0.01
    assert lr_at(2.5, VISSL, 1024, 4) == pytest.approx(0.4 * 2.5 / 5, rel=1e-3)
    assert lr_at(5.0, VISSL, 1024, 4) == pytest.approx(0.4)


def test_no_weight_decay_on_batchnorm() -> None:
    net = Network("resnet18", [10])
    decay, no_decay = param_groups(net, VISSL)
    bn_params = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert bn_params <= {id(p) for p in no_decay["params"]}
    assert not bn_params & {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(net.parameters()))


def test_epoch_batches_shard_without_overlap_and_resume_mid_epoch() -> None:
    ranks = [epoch_batches(1000, 3, 0, r, 4, 32) for r in range(4)]
    flat = [i for r in ranks for b in r for i in b]
    assert len(flat) == len(set(flat)) == 4 * 7 * 32  # 250 per rank -> 7 full batches each
    assert all(len(r) == 7 for r in ranks)
    assert epoch_batches(1000, 3, 0, 1, 4, 32) == ranks[1]  # deterministic
    assert epoch_batches(1000, 4, 0, 1, 4, 32) != ranks[1]  # reshuffled per epoch
    assert epoch_batches(1000, 3, 0, 1, 4, 32, skip=5) == ranks[1][5:]


def test_rotnet_batches_hold_four_rotations_with_their_labels() -> None:
    images = torch.randn(3, 3, 8, 8)
    rotated, labels = rotate_batch(images, torch.zeros(3))
    assert rotated.shape == (12, 3, 8, 8) and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    for r in range(4):
        assert torch.equal(torch.rot90(rotated[3 * r : 3 * r + 3], -r, dims=(2, 3)), images)
