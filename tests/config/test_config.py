"""The config schema, its loading and overrides, and the ImageNet recipes under VISSL's names."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from clusterfit.config import Config, ConfigError, config_from_args
from tests.conftest import cli

STEP1 = "pretrain/clusterfit/cluster_features_resnet_8gpu_rotation_in1k"
STEP2 = "pretrain/clusterfit/clusterfit_resnet_8gpu_imagenet"


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def test_override_values_are_parsed_to_the_fields_type() -> None:
    cfg = config_from_args(
        [
            "config=quickstart",
            "config.DATA.TRAIN.LABEL_PATHS=[a.npy]",
            "config.CLUSTERFIT.L2_NORMALIZE=false",
            "config.CLUSTERFIT.NUM_CLUSTERS=12",
            "config.STORAGE.S3.CONNECT_TIMEOUT_S=2",
            "config.DATA.TRANSFORMS.COLOR_JITTER=[0.1, 0.2, 0.3, 0.0]",
            "config.MODEL.WEIGHTS_INIT.REMOVE_PREFIX=",
        ]
    )
    assert cfg.DATA.TRAIN.LABEL_PATHS == ["a.npy"]
    assert cfg.CLUSTERFIT.L2_NORMALIZE is False
    assert cfg.CLUSTERFIT.NUM_CLUSTERS == 12 and isinstance(cfg.CLUSTERFIT.NUM_CLUSTERS, int)
    assert cfg.STORAGE.S3.CONNECT_TIMEOUT_S == 2.0 and isinstance(cfg.STORAGE.S3.CONNECT_TIMEOUT_S, float)
    assert cfg.DATA.TRANSFORMS.COLOR_JITTER == [0.1, 0.2, 0.3, 0.0]
    assert cfg.MODEL.WEIGHTS_INIT.REMOVE_PREFIX == ""


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ("config.EXPERIMENT.NAME=2024", ("EXPERIMENT", "NAME"), "2024"),
        ("config.EXPERIMENT.NAME=on", ("EXPERIMENT", "NAME"), "on"),
        ("config.CLUSTERFIT.FEATURES.DATASET_NAME=yes", ("CLUSTERFIT", "FEATURES", "DATASET_NAME"), "yes"),
        ("config.DATA.TRAIN.DATA_PATHS=[2024]", ("DATA", "TRAIN", "DATA_PATHS"), ["2024"]),
    ],
)
def test_string_fields_keep_values_that_look_like_numbers_or_booleans(
    override: str, key: tuple[str, ...], expected: Any
) -> None:
    # A text field gets the text the user typed, whatever YAML would make of it on its own.
    node: Any = config_from_args(["config=quickstart", override])
    for part in key:
        node = getattr(node, part)
    assert node == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        ('"trunk._feature_blocks."', "trunk._feature_blocks."),  # a pod's args: no shell took the quotes off
        ("'trunk.'", "trunk."),
        ('""', ""),
        ('"a \\"b\\""', 'a "b"'),  # an escaped quote inside
        ('"C:\\\\"', "C:\\"),  # backslashes before the closing quote are halved, as Hydra does
        ('"a\\b"', "a\\b"),  # other backslashes stay
        ('"it\'s"', "it's"),
        ("trunk.", "trunk."),
    ],
)
def test_a_quoted_override_value_is_the_text_inside_the_quotes(raw: str, expected: str) -> None:
    cfg = config_from_args(["config=quickstart", f"config.MODEL.WEIGHTS_INIT.APPEND_PREFIX={raw}"])
    prefix = cfg.MODEL.WEIGHTS_INIT.APPEND_PREFIX
    assert prefix == expected


def test_quoted_values_of_any_field_and_an_empty_state_dict_key() -> None:
    cfg = config_from_args(
        [
            "config='quickstart'",
            'config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=""',
            "config.EXPERIMENT.NAME='my run'",
            'config.CLUSTERFIT.NUM_CLUSTERS="12"',
            "config.DATA.TRAIN.LABEL_PATHS=['a b.npy']",
            "config.DATA.TRAIN.DATA_PATHS=[\"/data/x y\", '/data/z']",
        ]
    )
    assert cfg.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME == ""
    assert cfg.EXPERIMENT.NAME == "my run"
    assert cfg.CLUSTERFIT.NUM_CLUSTERS == 12
    assert cfg.DATA.TRAIN.LABEL_PATHS == ["a b.npy"]
    assert cfg.DATA.TRAIN.DATA_PATHS == ["/data/x y", "/data/z"]


@pytest.mark.parametrize("raw", ['"trunk.', "'trunk.\"", '"a"b', "'a' 'b'"])
def test_an_unbalanced_quote_is_an_error_naming_the_key(raw: str) -> None:
    with pytest.raises(ConfigError, match=r"config\.MODEL\.WEIGHTS_INIT\.APPEND_PREFIX: .*quot"):
        config_from_args(["config=quickstart", f"config.MODEL.WEIGHTS_INIT.APPEND_PREFIX={raw}"])


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("[classy_state_dict, base_model, model, trunk]", ["classy_state_dict", "base_model", "model", "trunk"]),
        ('["model", "state_dict"]', ["model", "state_dict"]),
        ("model.state_dict", "model.state_dict"),
        ("2024", "2024"),
        ("[2024]", ["2024"]),
        ("", ""),
    ],
)
def test_state_dict_key_name_takes_vissls_list_or_our_dotted_string(raw: str, expected: Any, tmp_path: Path) -> None:
    cfg = config_from_args(["config=quickstart", f"config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={raw}"])
    key_name = cfg.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME
    assert key_name == expected
    path = tmp_path / "vissl.yaml"
    path.write_text(
        "config:\n  MODEL:\n    WEIGHTS_INIT:\n      STATE_DICT_KEY_NAME: [classy_state_dict, base_model]\n"
    )
    from_file = config_from_args([f"config={path}"]).MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME
    assert from_file == ["classy_state_dict", "base_model"]


def test_an_empty_key_in_the_state_dict_key_list_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"MODEL\.WEIGHTS_INIT: .*STATE_DICT_KEY_NAME=.*empty key"):
        config_from_args(["config=quickstart", 'config.MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME=[classy_state_dict, ""]'])


def test_overrides_apply_after_the_file_and_merge_sections(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("CLUSTERFIT:\n  NUM_CLUSTERS: 7\n  N_ITER: 3\n")
    cfg = config_from_args([f"config={path}", "config.CLUSTERFIT.N_ITER=4"])
    assert (cfg.CLUSTERFIT.NUM_CLUSTERS, cfg.CLUSTERFIT.N_ITER) == (7, 4)


def test_vissl_layout_with_everything_under_config(tmp_path: Path) -> None:
    path = tmp_path / "vissl_style.yaml"
    path.write_text(
        "# @package _global_\nconfig:\n  CLUSTERFIT:\n    NUM_CLUSTERS: 123\n    FEATURES:\n      LAYER_NAME: res4\n"
        "  DISTRIBUTED:\n    NUM_PROC_PER_NODE: 2\n"
    )
    cfg = config_from_args([f"config={path}", "config.CLUSTERFIT.N_ITER=7"])
    assert cfg.CLUSTERFIT.NUM_CLUSTERS == 123 and cfg.CLUSTERFIT.FEATURES.LAYER_NAME == "res4"
    assert cfg.DISTRIBUTED.NUM_PROC_PER_NODE == 2 and cfg.CLUSTERFIT.N_ITER == 7


def test_seed_blocks_paste_in_unchanged(tmp_path: Path) -> None:
    # The seed's CLUSTERFIT and WEIGHTS_INIT blocks (keys and values as it documents them).
    path = tmp_path / "seed.yaml"
    path.write_text(
        """
CLUSTERFIT:
  NUM_CLUSTERS: 16000
  CLUSTER_BACKEND: faiss
  N_ITER: 50
  FEATURES:
    DATA_PARTITION: TRAIN
    DATASET_NAME: imagenet1k
    LAYER_NAME: res5
MODEL:
  WEIGHTS_INIT:
    PARAMS_FILE: ""
    STATE_DICT_KEY_NAME: "classy_state_dict"
    SKIP_LAYERS: ["num_batches_tracked"]
    REMOVE_PREFIX: ""
    APPEND_PREFIX: ""
"""
    )
    cfg = config_from_args([f"config={path}", "config.MODEL.WEIGHTS_INIT.APPEND_PREFIX=trunk._feature_blocks."])
    assert cfg.CLUSTERFIT.FEATURES.DATASET_NAME == "imagenet1k"
    assert cfg.MODEL.WEIGHTS_INIT.APPEND_PREFIX == "trunk._feature_blocks."


def test_seed_keys_exist_with_the_seeds_names_and_defaults() -> None:
    defaults = Config()
    assert defaults.CLUSTERFIT.NUM_CLUSTERS == 16000
    assert defaults.CLUSTERFIT.CLUSTER_BACKEND == "faiss"
    assert defaults.CLUSTERFIT.N_ITER == 50
    assert defaults.CLUSTERFIT.FEATURES.DATA_PARTITION == "TRAIN"
    assert defaults.CLUSTERFIT.FEATURES.LAYER_NAME == "res5"
    assert isinstance(defaults.CLUSTERFIT.FEATURES.DATASET_NAME, str)  # the embedded default names its own dataset
    weights = defaults.MODEL.WEIGHTS_INIT
    assert weights.PARAMS_FILE == "" and weights.STATE_DICT_KEY_NAME == "classy_state_dict"
    assert weights.SKIP_LAYERS == ["num_batches_tracked"]
    assert weights.REMOVE_PREFIX == "" and weights.APPEND_PREFIX == ""
    assert (defaults.DISTRIBUTED.NUM_NODES, defaults.DISTRIBUTED.NUM_PROC_PER_NODE) == (1, 1)
    assert defaults.DATA.TRAIN.LABEL_PATHS == []
    # The seed's command lines translate one to one.
    cfg = config_from_args(
        [
            "config=quickstart",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=8",
            "config.DISTRIBUTED.NUM_NODES=4",
            "config.DATA.TRAIN.LABEL_PATHS=[/data/labels_file_from_step1.npy]",
        ]
    )
    assert cfg.DISTRIBUTED.world_size == 32 and cfg.DATA.TRAIN.LABEL_PATHS == ["/data/labels_file_from_step1.npy"]


def config_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in typing.get_args(annotation) for model in config_models(arg)]


def test_every_field_is_documented() -> None:
    seen: set[type[BaseModel]] = set()
    undocumented: list[str] = []

    def walk(model: type[BaseModel], path: str) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            if len((info.description or "").strip()) < 10:
                undocumented.append(f"{path}{name}")
            for sub in config_models(info.annotation):
                walk(sub, f"{path}{name}.")

    walk(Config, "")
    assert len(seen) > 15  # the walk reached the nested sections (KUBERNETES included)
    assert undocumented == []


def test_config_schema_carries_the_descriptions() -> None:
    result = cli("config", "schema")
    assert result.returncode == 0, result.stderr
    assert "k-means iterations" in result.stdout.replace("K-means", "k-means")


# ---------------------------------------------------------------------------------------------
# The two ImageNet-1K recipes


def test_step1_recipe_carries_vissls_hyperparameters() -> None:
    cfg = config_from_args([f"config={STEP1}", "config.MODEL.WEIGHTS_INIT.PARAMS_FILE=/weights/rotnet.torch"])
    assert cfg.MODEL.TRUNK.NAME == "resnet50" and not cfg.MODEL.TRUNK.SMALL_IMAGE_STEM
    assert cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE == "/weights/rotnet.torch"
    features = cfg.CLUSTERFIT.FEATURES
    assert (features.DATA_PARTITION, features.DATASET_NAME, features.LAYER_NAME) == ("TRAIN", "imagenet1k", "res5")
    assert cfg.EXTRACT.POOL_SIZE == 1
    assert cfg.CLUSTERFIT.L2_NORMALIZE is True
    assert (cfg.CLUSTERFIT.NUM_CLUSTERS, cfg.CLUSTERFIT.CLUSTER_BACKEND, cfg.CLUSTERFIT.N_ITER) == (16000, "faiss", 50)
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (1, 8)
    assert "pretrain" not in cfg.PIPELINE.STEPS and {"extract", "cluster"} <= set(cfg.PIPELINE.STEPS)
    assert (cfg.DATA.TRANSFORMS.EVAL_RESIZE, cfg.DATA.TRANSFORMS.EVAL_CROP_SIZE) == (256, 224)
    assert cfg.DATA.TRAIN.DATA_SOURCES == ["disk_folder"]


def test_step1_features_are_2048_dimensional() -> None:
    import torch

    from clusterfit.models import Trunk, pool_features

    cfg = config_from_args([f"config={STEP1}"])
    trunk = Trunk(cfg.MODEL.TRUNK.NAME, cfg.MODEL.TRUNK.SMALL_IMAGE_STEM).eval()
    with torch.no_grad():
        maps = trunk.taps(torch.zeros(2, 3, 64, 64), [cfg.CLUSTERFIT.FEATURES.LAYER_NAME])[
            cfg.CLUSTERFIT.FEATURES.LAYER_NAME
        ]
    assert pool_features(maps, cfg.EXTRACT.POOL_SIZE).shape == (2, 2048)


def test_step2_recipe_carries_vissls_hyperparameters() -> None:
    from clusterfit.data import train_transform
    from clusterfit.training import lr_at, peak_lr

    cfg = config_from_args([f"config={STEP2}", "config.DATA.TRAIN.LABEL_PATHS=[/labels/step1.npy]"])
    assert cfg.DATA.TRAIN.LABEL_PATHS == ["/labels/step1.npy"]
    assert cfg.MODEL.TRUNK.NAME == "resnet50" and cfg.MODEL.WEIGHTS_INIT.PARAMS_FILE == ""  # from scratch
    assert cfg.PIPELINE.STEPS == ["train"]
    opt = cfg.OPTIMIZER
    assert (opt.NAME, opt.MOMENTUM, opt.NESTEROV, opt.NUM_EPOCHS) == ("sgd", 0.9, False, 105)
    assert opt.WEIGHT_DECAY == 1e-4 and opt.REGULARIZE_BN is False
    assert (opt.BASE_LR, opt.BASE_LR_BATCH_SIZE, opt.AUTO_SCALE_LR) == (0.1, 256, True)
    assert (opt.MILESTONES, opt.GAMMA) == ([30, 60, 90, 100], 0.1)
    assert opt.WARMUP_EPOCHS == 5
    transforms = cfg.DATA.TRANSFORMS
    assert transforms.TRAIN_CROP_SIZE == 224 and transforms.TRAIN_MIN_SCALE == 0.08
    assert transforms.COLOR_JITTER == [0.4, 0.4, 0.4, 0.2] and transforms.HORIZONTAL_FLIP is True
    assert cfg.DATA.TRAIN.BATCHSIZE_PER_REPLICA == 32
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (1, 8)
    assert cfg.CLUSTERFIT.NUM_CLUSTERS == 16000
    # Derived, never written back: global batch 256 on 8 GPUs -> LR 0.1, /10 at each milestone.
    assert cfg.global_batch_size == 256
    assert peak_lr(cfg.OPTIMIZER, cfg.global_batch_size) == pytest.approx(0.1)
    assert cfg.OPTIMIZER.BASE_LR == 0.1
    expected = {0: 0.1, 29.9: 0.1, 30: 0.01, 60: 0.001, 90: 1e-4, 100: 1e-5, 104.9: 1e-5}
    for epoch, lr in expected.items():
        assert lr_at(epoch, opt, 256, num_nodes=1) == pytest.approx(lr), epoch  # one node: no warm-up
    # Four nodes (32 GPUs): LR 0.4, reached after 5 warm-up epochs from one node's LR 0.1 (VISSL's).
    assert peak_lr(opt, 1024) == pytest.approx(0.4)
    assert lr_at(0, opt, 1024, num_nodes=4) == pytest.approx(0.1)
    assert lr_at(2.5, opt, 1024, num_nodes=4) == pytest.approx(0.22)
    assert lr_at(5, opt, 1024, num_nodes=4) == pytest.approx(0.4)
    # The training transform: RandomResizedCrop 224, ColorJitter(0.4, 0.4, 0.4, 0.2), flip.
    steps = train_transform(transforms).transforms  # type: ignore[attr-defined]
    names = [type(step).__name__ for step in steps]
    assert names[:3] == ["RandomResizedCrop", "ColorJitter", "RandomHorizontalFlip"]
    assert steps[0].size == (224, 224) and steps[0].scale == (0.08, 1.0)
    jitter = steps[1]
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.6, 1.4),
        (-0.2, 0.2),
    )


def test_step2_recipe_exempts_batchnorm_from_weight_decay() -> None:
    from torch import nn

    from clusterfit.training import param_groups

    cfg = config_from_args([f"config={STEP2}"])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    groups = {group["weight_decay"]: {id(p) for p in group["params"]} for group in param_groups(model, cfg.OPTIMIZER)}
    assert groups[1e-4] >= {id(model[0].weight), id(model[3].weight)}
    assert {id(model[1].weight), id(model[1].bias)} <= groups[0.0]


def test_recipes_resolve_through_the_cli() -> None:
    result = cli("config", "show", f"config={STEP2}", "config.DATA.TRAIN.LABEL_PATHS=[/labels/step1.npy]")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["DATA"]["TRAIN"]["LABEL_PATHS"] == ["/labels/step1.npy"]


def test_config_error_is_a_value_error_naming_the_source() -> None:
    with pytest.raises(ConfigError) as err:
        config_from_args(["config=quickstart", "config.CLUSTERFIT.N_ITER=0"])
    assert str(err.value).startswith("quickstart: invalid config") and "CLUSTERFIT.N_ITER" in str(err.value)
