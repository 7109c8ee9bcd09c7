"""VISSL's spellings of the ClusterFit keys, and the RotNet config under VISSL's name."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterfit.config import ConfigError, config_from_args, load_config, to_yaml
from tests.conftest import cli

ROTNET = "pretrain/rotnet/rotnet_8gpu_resnet"


def test_num_iter_is_n_iter_in_yaml_overrides_and_load_config(tmp_path: Path) -> None:
    path = tmp_path / "vissl.yaml"
    path.write_text("config:\n  CLUSTERFIT:\n    NUM_ITER: 7\n")
    assert load_config(str(path)).CLUSTERFIT.N_ITER == 7
    assert config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_ITER=9"]).CLUSTERFIT.N_ITER == 9
    assert load_config("quickstart", {"CLUSTERFIT.NUM_ITER": 11}).CLUSTERFIT.N_ITER == 11
    # An override of either spelling wins over the file's other spelling (the quickstart sets N_ITER).
    assert load_config("quickstart", {"CLUSTERFIT": {"NUM_ITER": 3}}).CLUSTERFIT.N_ITER == 3


def test_config_show_prints_the_canonical_key() -> None:
    proc = cli("config", "show", "config=quickstart", "config.CLUSTERFIT.NUM_ITER=13")
    assert proc.returncode == 0, proc.stderr
    assert "N_ITER: 13" in proc.stdout and "NUM_ITER" not in proc.stdout
    assert "NUM_ITER" not in to_yaml(load_config(None, {"CLUSTERFIT.NUM_ITER": 13}))


def test_alias_and_canonical_key_with_different_values_is_an_error_naming_both(tmp_path: Path) -> None:
    path = tmp_path / "both.yaml"
    path.write_text("CLUSTERFIT:\n  N_ITER: 20\n  NUM_ITER: 30\n")
    with pytest.raises(ConfigError, match=r"CLUSTERFIT\.NUM_ITER.*CLUSTERFIT\.N_ITER"):
        load_config(str(path))
    path.write_text("CLUSTERFIT:\n  N_ITER: 20\n  NUM_ITER: 20\n")
    assert load_config(str(path)).CLUSTERFIT.N_ITER == 20  # the same value twice is no conflict


def test_vissls_clusterfit_block_pastes_in(tmp_path: Path) -> None:
    """VISSL's defaults.yaml CLUSTERFIT keys that we implement, as VISSL writes them."""
    path = tmp_path / "vissl.yaml"
    path.write_text(
        "config:\n"
        "  CLUSTERFIT:\n"
        "    NUM_ITER: 50\n"
        "    NUM_CLUSTERS: 16000\n"
        "    DATA_LIMIT: 1000000\n"
        "    CLUSTER_BACKEND: faiss\n"
        "    FEATURES:\n"
        "      DATA_PARTITION: TRAIN\n"
        "      TEST_PARTITION: TEST\n"
        "      DATASET_NAME: imagenet1k\n"
        "      LAYER_NAME: res5\n"
        "      DIMENSIONALITY_REDUCTION: 256\n"
    )
    c = load_config(str(path)).CLUSTERFIT
    assert (c.N_ITER, c.DATA_LIMIT) == (50, 1000000)
    assert (c.FEATURES.TEST_PARTITION, c.FEATURES.DIMENSIONALITY_REDUCTION) == ("TEST", 256)
    assert c.FEATURES.PCA_WHITENING == "whiten"  # VISSL's PCA whitens
    overridden = config_from_args(
        [
            "config=quickstart",
            "config.CLUSTERFIT.FEATURES.TEST_PARTITION=",
            "config.CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION=32",
            "config.CLUSTERFIT.FEATURES.PCA_WHITENING=whiten_l2",
            "config.CLUSTERFIT.DATA_LIMIT=500",
        ]
    ).CLUSTERFIT
    assert overridden.FEATURES.TEST_PARTITION == ""
    assert (overridden.FEATURES.DIMENSIONALITY_REDUCTION, overridden.FEATURES.PCA_WHITENING) == (32, "whiten_l2")
    assert overridden.DATA_LIMIT == 500


def test_defaults_behave_as_before_the_vissl_keys() -> None:
    c = load_config(None).CLUSTERFIT
    assert c.DATA_LIMIT == -1 and c.FEATURES.DIMENSIONALITY_REDUCTION == 0 and c.FEATURES.TEST_PARTITION is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("config.CLUSTERFIT.DATA_LIMIT=5", r"CLUSTERFIT\.DATA_LIMIT=5 .*NUM_CLUSTERS=10"),  # fewer points than K
        ("config.CLUSTERFIT.DATA_LIMIT=0", r"CLUSTERFIT\.DATA_LIMIT=0 .*NUM_CLUSTERS=10"),
        ("config.CLUSTERFIT.FEATURES.DIMENSIONALITY_REDUCTION=-1", r"DIMENSIONALITY_REDUCTION.*greater than or equal"),
        ("config.CLUSTERFIT.FEATURES.TEST_PARTITION=VAL", r"TEST_PARTITION.*'TRAIN', 'TEST'"),
    ],
)
def test_bad_vissl_values_fail_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=10", override])


def test_superkmeans_with_the_torch_backend_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"ALGORITHM.*CLUSTER_BACKEND"):
        config_from_args(
            ["config=quickstart", "config.CLUSTERFIT.CLUSTER_BACKEND=torch", "config.CLUSTERFIT.ALGORITHM=superkmeans"]
        )


def test_rotnet_config_carries_vissls_rotnet_8gpu_settings() -> None:
    cfg = config_from_args([f"config={ROTNET}"])
    assert cfg.PIPELINE.STEPS == ["pretrain"]
    assert cfg.DATA.TRAIN.DATA_SOURCES == ["disk_folder"] and cfg.DATA.TRAIN.DATA_PATHS
    assert cfg.MODEL.TRUNK.NAME == "resnet50" and not cfg.MODEL.TRUNK.SMALL_IMAGE_STEM
    assert (cfg.DISTRIBUTED.NUM_NODES, cfg.DISTRIBUTED.NUM_PROC_PER_NODE) == (1, 8)
    assert cfg.PRETRAIN.BATCHSIZE_PER_REPLICA == 32 and cfg.DATA.NUM_DATALOADER_WORKERS == 5
    opt = cfg.PRETRAIN.OPTIMIZER
    assert (opt.NUM_EPOCHS, opt.MILESTONES, opt.GAMMA) == (105, [30, 60, 90, 100], 0.1)
    assert (opt.BASE_LR, opt.BASE_LR_BATCH_SIZE, opt.AUTO_SCALE_LR) == (0.1, 256, True)
    assert (opt.MOMENTUM, opt.NESTEROV, opt.WEIGHT_DECAY) == (0.9, False, 1e-4)
    assert (opt.REGULARIZE_BN, opt.REGULARIZE_BIAS, opt.WARMUP_EPOCHS) == (False, True, 0)
    assert cfg.DATA.TRANSFORMS.TRAIN_CROP_SIZE == 224 and cfg.DATA.TRANSFORMS.COLOR_JITTER == [0, 0, 0, 0]
    assert cfg.CHECKPOINT.AUTO_RESUME and cfg.CHECKPOINT.CHECKPOINT_FREQUENCY == 1
    # The seed's command lines: 1 GPU, and 4 machines of 8.
    four = config_from_args(
        [f"config={ROTNET}", "config.DISTRIBUTED.NUM_PROC_PER_NODE=8", "config.DISTRIBUTED.NUM_NODES=4"]
    )
    assert four.DISTRIBUTED.world_size == 32
