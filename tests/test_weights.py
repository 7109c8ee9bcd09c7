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


# ---------------------------------------------------------------------------------------------
# VISSL parity (issue 14): SKIP_LAYERS on the model's names, prefixes under classy_state_dict,
# STATE_DICT_KEY_NAME as a list, our own final.pt in VISSL's layout.


def ddp_torchvision_checkpoint(net: Network) -> dict[str, torch.Tensor]:
    """A torchvision state dict saved from a DistributedDataParallel wrapper: every key under `module.`."""
    return {"module." + k: v for k, v in torchvision_checkpoint(net).items()}


@pytest.mark.parametrize(
    "pattern",
    [
        "trunk._feature_blocks.layer4",  # the model's name, as VISSL matches SKIP_LAYERS
        "module.layer4",  # the checkpoint's own name, before the prefixes: still honoured
    ],
)
def test_skip_layers_matches_the_models_names_after_the_prefixes(tmp_path: Path, reference, pattern: str) -> None:  # type: ignore[no-untyped-def]
    net, _, _ = reference
    torch.save(ddp_torchvision_checkpoint(net), tmp_path / "ddp.pth")
    fresh = Network("resnet18").eval()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_weights(
        fresh,
        WeightsInitConfig(
            PARAMS_FILE=str(tmp_path / "ddp.pth"),
            STATE_DICT_KEY_NAME="",
            SKIP_LAYERS=["num_batches_tracked", pattern],
            REMOVE_PREFIX="module.",
            APPEND_PREFIX="trunk._feature_blocks.",
        ),
    )
    after, loaded_from = fresh.state_dict(), net.state_dict()
    layer4 = [k for k in after if k.startswith("trunk._feature_blocks.layer4.") and "num_batches" not in k]
    layer3 = [k for k in after if k.startswith("trunk._feature_blocks.layer3.") and "num_batches" not in k]
    assert layer4 and layer3
    assert all(torch.equal(after[k], before[k]) for k in layer4)  # left as initialised
    assert not any(torch.equal(after[k], loaded_from[k]) for k in layer4 if k.endswith("conv1.weight"))
    assert all(torch.equal(after[k], loaded_from[k]) for k in layer3)
    assert set(layer4) <= set(report.skipped) and not set(layer4) & set(report.loaded)
    assert not set(layer4) & set(report.missing)  # skipped on purpose is not missing: no error


@pytest.mark.parametrize(
    "prefixes",
    [
        {"APPEND_PREFIX": "trunk."},  # VISSL's advice for a non-VISSL file, given for a VISSL one
        {"REMOVE_PREFIX": "module.", "APPEND_PREFIX": "trunk.base_model._feature_blocks."},
    ],
)
def test_prefixes_are_ignored_under_classy_state_dict_as_vissl_does(tmp_path: Path, reference, prefixes) -> None:  # type: ignore[no-untyped-def]
    net, images, expected = reference
    torch.save(vissl_checkpoint(net), tmp_path / "vissl.torch")
    got = features_after_loading(tmp_path / "vissl.torch", images, STATE_DICT_KEY_NAME="classy_state_dict", **prefixes)
    for layer in expected:
        assert torch.equal(got[layer], expected[layer])


def test_vissl_feature_extractor_trunk_names_load(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    # VISSL's linear-evaluation runs save the trunk as `base_model._feature_blocks.…`.
    net, images, expected = reference
    ckpt = vissl_checkpoint(net)
    model = ckpt["classy_state_dict"]["base_model"]["model"]
    model["trunk"] = {"base_model." + k: v for k, v in model["trunk"].items()}
    torch.save(ckpt, tmp_path / "eval.torch")
    got = features_after_loading(tmp_path / "eval.torch", images)
    assert torch.equal(got["res5avg"], expected["res5avg"])


@pytest.mark.parametrize(
    "key_name, prefix",
    [
        (["model", "state_dict"], "trunk._feature_blocks."),  # VISSL's list of nested keys
        ("model.state_dict", "trunk._feature_blocks."),  # our dotted string
        (["classy_state_dict", "base_model", "model", "trunk"], "trunk."),  # the path VISSL's FSDP loader reads
    ],
)
def test_state_dict_key_name_as_a_list_of_nested_keys(tmp_path: Path, reference, key_name, prefix: str) -> None:  # type: ignore[no-untyped-def]
    net, images, expected = reference
    torch.save({"model": {"state_dict": torchvision_checkpoint(net)}, **vissl_checkpoint(net)}, tmp_path / "x.pt")
    got = features_after_loading(tmp_path / "x.pt", images, STATE_DICT_KEY_NAME=key_name, APPEND_PREFIX=prefix)
    for layer in expected:
        assert torch.equal(got[layer], expected[layer])


def test_a_wrong_key_in_the_list_names_the_key_and_the_path(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    net, _, _ = reference
    torch.save({"model": {"state_dict": net.state_dict()}}, tmp_path / "x.pt")
    with pytest.raises(WeightsError, match=r"x\.pt: .*STATE_DICT_KEY_NAME=\['model', 'weights'\]: key 'weights' "):
        load_weights(
            Network("resnet18"),
            WeightsInitConfig(PARAMS_FILE=str(tmp_path / "x.pt"), STATE_DICT_KEY_NAME=["model", "weights"]),
        )


def test_our_final_checkpoint_loads_back_heads_included(tmp_path: Path, reference) -> None:  # type: ignore[no-untyped-def]
    from clusterfit.checkpoint import TrainState, final_checkpoint
    from clusterfit.config import Config

    net, images, expected = reference
    trained = Network("resnet18", [7])
    trained.load_state_dict(net.state_dict(), strict=False)
    (tmp_path / "final.pt").write_bytes(final_checkpoint(trained, TrainState(epoch=2, step=10), Config()))
    fresh = Network("resnet18", [7]).eval()
    report = load_weights(fresh, WeightsInitConfig(PARAMS_FILE=str(tmp_path / "final.pt")))
    assert not report.missing and not report.unexpected
    assert torch.equal(fresh.heads[0].weight, trained.heads[0].weight)
    with torch.inference_mode():
        assert torch.equal(fresh.trunk.taps(images, ["res5avg"])["res5avg"], expected["res5avg"])
