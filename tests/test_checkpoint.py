"""Our checkpoints in VISSL's layout: VISSL's loading path finds every tensor; old files still load."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from clusterfit.checkpoint import TrainState, final_checkpoint, load_latest, make_checkpoint, restore, save_checkpoint
from clusterfit.config import Config
from clusterfit.models import Network
from clusterfit.storage import Store, open_store


def vissl_init_names(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The {model name: tensor} VISSL loads from a file with its default STATE_DICT_KEY_NAME=classy_state_dict,
    read the way vissl/utils/checkpoint.py does it (CheckpointLoader._update_version, then
    init_model_from_consolidated_weights -> get_checkpoint_model_state_dict, not a feature-extractor model)."""
    checkpoint.setdefault("type", "consolidated")
    assert checkpoint["type"] == "consolidated"  # else VISSL looks for shards
    state = checkpoint["classy_state_dict"]["base_model"]["model"]
    trunk = {
        (k.replace("base_model.", "", 1) if k.startswith("base_model.") else k): v for k, v in state["trunk"].items()
    }
    names = {f"trunk.{k}": v for k, v in trunk.items()}
    names.update({f"heads.{k}": v for k, v in state["heads"].items()})
    return names


def vissl_resnet_names(arch: str, head_classes: int) -> set[str]:
    """VISSL's names for a `resnet` trunk (torchvision's ResNet blocks under `_feature_blocks`, no fc) and a
    one-layer `mlp` head (`clf.0`): the independent oracle."""
    trunk = {f"trunk._feature_blocks.{k}" for k in torchvision.models.get_model(arch).state_dict() if "fc." not in k}
    return trunk | ({"heads.0.clf.0.weight", "heads.0.clf.0.bias"} if head_classes else set())


@pytest.fixture(scope="module")
def trained() -> Network:
    torch.manual_seed(5)
    return Network("resnet18", [7])


def written(data: bytes) -> dict[str, Any]:
    ckpt: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return ckpt


def test_final_checkpoint_loads_in_vissl_with_every_trunk_tensor(trained: Network) -> None:
    ckpt = written(final_checkpoint(trained, TrainState(epoch=3, step=30), Config()))
    got = vissl_init_names(ckpt)
    assert set(got) == vissl_resnet_names("resnet18", 7)
    ours = trained.state_dict()
    for name in ours:
        if name.startswith("trunk."):
            assert torch.equal(got[name], ours[name]), name
    assert torch.equal(got["heads.0.clf.0.weight"], ours["heads.0.weight"])
    assert torch.equal(got["heads.0.clf.0.bias"], ours["heads.0.bias"])


def test_resumable_checkpoints_have_the_same_layout_and_restore(tmp_path, trained: Network) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    store = open_store(tmp_path.as_uri())
    save_checkpoint(store, "train", make_checkpoint(trained, optimizer, TrainState(1, 9, 0), Config(), "fp"))
    ckpt = load_latest(store, "train")
    assert ckpt is not None
    assert set(vissl_init_names(dict(ckpt))) == vissl_resnet_names("resnet18", 7)
    fresh = Network("resnet18", [7])
    state = restore(ckpt, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert (state.epoch, state.step) == (1, 9)
    for name, tensor in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_a_checkpoint_in_the_old_flat_layout_still_resumes(tmp_path, trained: Network) -> None:  # type: ignore[no-untyped-def]
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    old = make_checkpoint(trained, optimizer, TrainState(2, 4, 1), Config(), "fp")
    old.update({"format_version": 1, "classy_state_dict": trained.state_dict()})  # as runs before format 2 wrote it
    store = open_store(tmp_path.as_uri())
    save_checkpoint(store, "train", old)
    ckpt = load_latest(store, "train")
    assert ckpt is not None
    fresh = Network("resnet18", [7])
    restore(ckpt, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1))
    assert torch.equal(fresh.heads[0].weight, trained.heads[0].weight)


def two_checkpoints(tmp_path: Path, trained: Network) -> tuple[Store, list[Path]]:
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    store = open_store(tmp_path.as_uri())
    for epoch in (1, 2):
        save_checkpoint(
            store, "train", make_checkpoint(trained, optimizer, TrainState(epoch, 10 * epoch, 0), Config(), "fp")
        )
    return store, sorted((tmp_path / "train/checkpoints").iterdir())


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing"])
def test_a_damaged_newest_checkpoint_resumes_from_the_previous_one_and_says_so(
    tmp_path: Path, trained: Network, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    store, (previous, newest) = two_checkpoints(tmp_path, trained)
    data = newest.read_bytes()
    if damage == "truncated":  # preemption mid-write on a store without atomic rename
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # same length, one byte of tensor data changed: only the checksum sees it
        middle = len(data) // 2
        newest.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :])
    else:
        newest.unlink()
    with caplog.at_level(logging.WARNING):
        ckpt = load_latest(store, "train")
    assert ckpt is not None and ckpt["epoch"] == 1
    assert newest.name in caplog.text and f"previous good checkpoint {previous.as_uri()}" in caplog.text


def test_no_readable_checkpoint_starts_over_naming_what_it_skipped(
    tmp_path: Path, trained: Network, caplog: pytest.LogCaptureFixture
) -> None:
    store, paths = two_checkpoints(tmp_path, trained)
    for path in paths:
        path.write_bytes(b"PK\x03\x04 cut")
    with caplog.at_level(logging.WARNING):
        assert load_latest(store, "train") is None
    assert "no readable checkpoint" in caplog.text and all(p.name in caplog.text for p in paths)


def test_an_unreadable_latest_pointer_falls_back_to_the_newest_checkpoint(tmp_path: Path, trained: Network) -> None:
    store, _ = two_checkpoints(tmp_path, trained)
    (tmp_path / "train/latest.json").write_bytes(b'{"checkpoint": "chec')
    ckpt = load_latest(store, "train")
    assert ckpt is not None and ckpt["epoch"] == 2
