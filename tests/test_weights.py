"""MODEL.WEIGHTS_INIT as the seed documents it, on torchvision, VISSL-layout and our own checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from clusterfit.config import WeightsInitConfig
from clusterfit.models import Network
from clusterfit.weights import WeightsError, load_weights


@pytest.fixture(scope="module")
def reference() -> tuple[Network, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(3)
    net = Network("resnet18").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a missed buffer shows
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    images = torch.randn(4, 3, 64, 64)
    with torch.inference_mode():
        feats = net.trunk.taps(images, ["res4", "res5avg"])
    return net, images, feats


def torchvision_checkpoint(net: Network) -> dict[str, torch.Tensor]:
    """The trunk's weights as a real torchvision resnet18 state dict (fc included)."""
    tv = torchvision.models.get_model("resnet18", weights=None)
    state = {k.removeprefix("trunk._feature_blocks."): v for k, v in net.state_dict().items() if k.startswith("trunk.")}
    state.update({"fc.weight": tv.fc.weight.detach(), "fc.bias": tv.fc.bias.detach()})
    assert set(state) == set(tv.state_dict())  # genuinely torchvision's layout
    return state


def vissl_checkpoint(net: Network) -> dict:
    trunk = {k.removeprefix("trunk."): v for k, v in net.state_dict().items() if k.startswith("trunk.")}
    return {
        "classy_state_dict": {
            "base_model": {"model": {"trunk": trunk, "heads": {"0.clf.0.weight": torch.zeros(10, 512)}}}
        },
        "phase_idx": 3,
    }


def features_after_loading(path: Path, images: torch.Tensor, **options: object) -> dict[str, torch.Tensor]:
    net = Network("resnet18").eval()
    report = load_weights(net, WeightsInitConfig(PARAMS_FILE=str(path), **options))
    assert not [k for k in report.missing if k.startswith("trunk.")]
    with torch.inference_mode():
        return net.trunk.taps(images, ["res4", "res5avg"])


@pytest.mark.parametrize("prefix", ["trunk._feature_blocks.", "trunk.base_model._feature_blocks."])
def test_torchvision_checkpoint_with_the_seeds_append_prefix(tmp_path: Path, reference, prefix: str) -> None:  # type: ignore[no-untyped-def]
    net, images, expected = reference
    path = tmp_path / "tv.pth"
    torch.save(torchvision_checkpoint(net), path)
    got = features_after_loading(path, images, STATE_DICT_KEY_NAME="", APPEND_PREFIX=prefix)
    for layer in expected:
        assert torch.equal(got[layer], expected[layer])


def test_vissl_and_torchvision_layouts_give_identical_features(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, images, _ = reference
    torch.save(torchvision_checkpoint(net), tmp_path / "tv.pth")
    torch.save(vissl_checkpoint(net), tmp_path / "vissl.torch")
    tv = features_after_loading(
        tmp_path / "tv.pth", images, STATE_DICT_KEY_NAME="", APPEND_PREFIX="trunk._feature_blocks."
    )
    vissl = features_after_loading(tmp_path / "vissl.torch", images)  # the seed's defaults
    for layer in tv:
        assert torch.equal(tv[layer], vissl[layer])


def test_our_own_checkpoint_loads_with_defaults(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, images, expected = reference
    torch.save({"classy_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ours.pt")
    got = features_after_loading(tmp_path / "ours.pt", images)
    assert torch.equal(got["res5avg"], expected["res5avg"])


def test_a_forgotten_prefix_is_an_error_not_a_random_trunk(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, _, _ = reference
    torch.save(torchvision_checkpoint(net), tmp_path / "tv.pth")
    with pytest.raises(WeightsError, match=r"trunk parameters not found.*APPEND_PREFIX"):
        load_weights(
            Network("resnet18"), WeightsInitConfig(PARAMS_FILE=str(tmp_path / "tv.pth"), STATE_DICT_KEY_NAME="")
        )


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path: Path) -> None:
    torch.save(torchvision.models.get_model("resnet50", weights=None).state_dict(), tmp_path / "r50.pth")
    with pytest.raises(
        WeightsError,
        match=r"trunk\._feature_blocks\.layer1\.0\.conv1\.weight: "
        r"checkpoint \(64, 64, 1, 1\) vs model \(64, 64, 3, 3\)",
    ):
        load_weights(
            Network("resnet18"),
            WeightsInitConfig(
                PARAMS_FILE=str(tmp_path / "r50.pth"), STATE_DICT_KEY_NAME="", APPEND_PREFIX="trunk._feature_blocks."
            ),
        )


def test_wrong_state_dict_key_names_the_key(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, _, _ = reference
    torch.save({"model": net.state_dict()}, tmp_path / "x.pt")
    with pytest.raises(
        WeightsError,
        match=r"STATE_DICT_KEY_NAME='classy_state_dict': key 'classy_state_dict' not found \(available: \['model'\]\)",
    ):
        load_weights(Network("resnet18"), WeightsInitConfig(PARAMS_FILE=str(tmp_path / "x.pt")))


def test_skip_layers_and_remove_prefix(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, images, expected = reference
    state = {"module." + k: v for k, v in torchvision_checkpoint(net).items()}  # a DDP-saved checkpoint
    torch.save({"state_dict": state}, tmp_path / "ddp.pth")
    fresh = Network("resnet18").eval()
    report = load_weights(
        fresh,
        WeightsInitConfig(
            PARAMS_FILE=str(tmp_path / "ddp.pth"),
            STATE_DICT_KEY_NAME="state_dict",
            REMOVE_PREFIX="module.",
            APPEND_PREFIX="trunk._feature_blocks.",
        ),
    )
    assert len(report.skipped) == 20 and all("num_batches_tracked" in k for k in report.skipped)
    assert sorted(report.unexpected) == ["trunk._feature_blocks.fc.bias", "trunk._feature_blocks.fc.weight"]
    with torch.inference_mode():
        assert torch.equal(fresh.trunk.taps(images, ["res5avg"])["res5avg"], expected["res5avg"])


def test_params_file_on_s3(s3_server, s3_bucket: str, s3_env, reference) -> None:  # type: ignore[no-untyped-def]
    import io

    from clusterfit.storage import open_store

    net, images, expected = reference
    buffer = io.BytesIO()
    torch.save(vissl_checkpoint(net), buffer)
    settings = s3_server.settings()
    open_store(s3_bucket, settings).put_bytes("weights/rotnet.torch", buffer.getvalue())
    fresh = Network("resnet18").eval()
    load_weights(fresh, WeightsInitConfig(PARAMS_FILE=f"{s3_bucket}/weights/rotnet.torch"), settings)
    with torch.inference_mode():
        assert torch.equal(fresh.trunk.taps(images, ["res5avg"])["res5avg"], expected["res5avg"])
