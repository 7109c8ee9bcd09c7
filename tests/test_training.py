"""The training recipe's pure pieces: LR schedule, weight-decay groups, epoch order, RotNet batches, and the
images DATA.ON_BAD_IMAGE=skip skipped kept out of the loss."""

from __future__ import annotations

import pytest
import torch

from clusterfit.checkpoint import TrainState
from clusterfit.config import OptimizerConfig
from clusterfit.models import Network
from clusterfit.steps.pretrain import rotate_batch
from clusterfit.training import (
    IGNORE,
    EpochContext,
    epoch_batches,
    ignore_skipped,
    lr_at,
    param_groups,
    peak_lr,
    train_one_epoch,
)

VISSL = OptimizerConfig()  # the ImageNet recipe's defaults


def test_lr_scales_with_global_batch_and_steps_down_at_milestones() -> None:
    assert peak_lr(VISSL, 256) == pytest.approx(0.1)
    assert peak_lr(VISSL, 1024) == pytest.approx(0.4)
    assert lr_at(0.0, VISSL, 256, num_nodes=1) == pytest.approx(0.1)  # no warm-up on one node
    assert lr_at(29.9, VISSL, 256, 1) == pytest.approx(0.1)
    assert lr_at(30.0, VISSL, 256, 1) == pytest.approx(0.01)
    assert lr_at(95.0, VISSL, 256, 1) == pytest.approx(1e-4)
    assert lr_at(104.0, VISSL, 256, 1) == pytest.approx(1e-5)


# VISSL's clusterfit_resnet_8gpu_imagenet on 4 nodes x 8 GPUs x 32 images (global batch 1024), worked
# out by hand from its config and vissl/utils/hydra_config.py (get_scaled_lr_scheduler,
# resolve_linear_schedule) with fvcore's composite/linear/multistep schedulers, updated once per
# epoch: linear from 0.1 x per-node batch 256 / 256 = 0.1 to 0.1 x 1024 / 256 = 0.4 over the first
# 5/105 of training ("rescaled"), then multistep 0.4, 0.04, ... at 30/60/90/100 ("fixed").
VISSL_4_NODES = {0: 0.1, 1: 0.16, 2: 0.22, 3: 0.28, 4: 0.34, 5: 0.4, 29: 0.4, 30: 0.04, 60: 0.004, 90: 4e-4, 104: 4e-5}


def test_four_nodes_warm_up_from_the_per_node_lr_once_per_epoch_as_vissl_does() -> None:
    for epoch, lr in VISSL_4_NODES.items():
        assert lr_at(epoch, VISSL, 1024, num_nodes=4) == pytest.approx(lr, rel=1e-5), epoch
    # Set once per epoch: every step of epoch 2 (fractional epochs 2.0 .. 2.99) trains at epoch 2's LR.
    for step_fraction in (0.0, 0.25, 0.5, 0.99):
        assert lr_at(2 + step_fraction, VISSL, 1024, 4) == pytest.approx(0.22, rel=1e-5)


def test_warm_up_starts_at_the_lr_of_one_nodes_batch() -> None:
    # 2 nodes x 8 GPUs x 64 images: per-node batch 512 -> start 0.2, global 1024 -> 0.4.
    expected = [0.2, 0.24, 0.28, 0.32, 0.36, 0.4]
    assert [lr_at(e, VISSL, 1024, num_nodes=2) for e in range(6)] == pytest.approx(expected, rel=1e-5)


def test_one_node_has_no_warm_up() -> None:
    # VISSL drops the linear part on one node: it starts at the LR of one node's batch, which is the scaled LR.
    assert [lr_at(e, VISSL, 256, num_nodes=1) for e in (0, 0.5, 4.9, 29)] == pytest.approx([0.1] * 4)


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


def test_a_skipped_image_is_out_of_the_loss_at_every_rotation() -> None:
    images = torch.stack([torch.ones(3, 4, 4), torch.zeros(3, 4, 4), torch.full((3, 4, 4), 2.0)])
    inputs, labels = rotate_batch(images, torch.zeros(3))
    ignored = ignore_skipped(labels, ["", "zero_bytes", ""])  # the second is a skipped image's blank
    blank = inputs.flatten(1).abs().sum(1) == 0  # the oracle: the rows that hold the blank
    assert torch.equal(ignored == IGNORE, blank) and torch.equal(ignored[~blank], labels[~blank])


def test_an_epoch_trains_on_the_read_images_only_and_counts_the_skipped_ones() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    good = torch.ones(1, 3, 2, 2)
    expected = torch.nn.functional.cross_entropy(model(good), torch.tensor([2])).item()  # before any step
    ctx = EpochContext(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loss_fn=torch.nn.CrossEntropyLoss(),
        device=torch.device("cpu"),
        amp=False,
        lr_fn=lambda epoch: 0.1,
        batches_per_epoch=2,
        batch_fn=lambda images, targets: (images, targets),
        on_step=lambda state: None,
    )
    blank = torch.zeros(2, 3, 2, 2)
    loader = [
        (blank, torch.tensor([1, 3]), ["zero_bytes", "missing"]),  # nothing to learn from: a step with zero loss
        (torch.cat([good, blank[:1]]), torch.tensor([2, 0]), ["", "missing"]),
    ]
    state = TrainState()
    stats = train_one_epoch(ctx, loader, state, 0)
    assert state.step == 2 and stats["skipped_by_reason"] == {"missing": 2, "zero_bytes": 1}
    assert stats["loss"] == pytest.approx(expected)  # the first step left the weights as they were
