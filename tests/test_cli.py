"""The command line: help, `config show`, and bad input as one clear error line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clusterfit.config import STEPS, config_from_args
from tests.conftest import cli, error_of

# ---------------------------------------------------------------------------------------------
# The command line


def test_help_lists_the_steps() -> None:
    result = cli("--help")
    assert result.returncode == 0, result.stderr
    for step in ("pretrain", "extract", "cluster", "train", "evaluate", "run"):
        assert f"\n    {step} " in result.stdout, step
    assert set(STEPS) == {"pretrain", "extract", "cluster", "train", "evaluate"}


def test_config_show_prints_the_resolved_config_with_the_override(tmp_path: Path) -> None:
    result = cli("config", "show", "config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=10")
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    print(result.stdout[result.stdout.index("CLUSTERFIT:") :][:200])
    assert shown["CLUSTERFIT"]["NUM_CLUSTERS"] == 10
    assert shown["EXPERIMENT"]["NAME"] == "quickstart"  # from configs/quickstart.yaml
    assert shown["CLUSTERFIT"]["N_ITER"] == 50 and shown["STORAGE"]["S3"]["MAX_ATTEMPTS"] == 5  # resolved defaults too
    assert shown == config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=10"]).model_dump(mode="json")
    # What it prints is itself a valid config file that resolves to the same thing.
    (tmp_path / "shown.yaml").write_text(result.stdout)
    assert config_from_args([f"config={tmp_path / 'shown.yaml'}"]).model_dump(mode="json") == shown


@pytest.mark.parametrize(
    "override, culprit, hint",
    [
        ("config.CLUSTERFIT.NUM_CLUSTER=10", "CLUSTERFIT.NUM_CLUSTER", "did you mean CLUSTERFIT.NUM_CLUSTERS?"),
        ("config.CLUSTERFT.NUM_CLUSTERS=10", "CLUSTERFT", "did you mean CLUSTERFIT?"),
        (
            "config.MODEL.WEIGHTS_INIT.PARAM_FILE=x.torch",
            "MODEL.WEIGHTS_INIT.PARAM_FILE",
            "did you mean MODEL.WEIGHTS_INIT.PARAMS_FILE?",
        ),
        (
            "config.DISTRIBUTED.NUM_PROCS_PER_NODE=2",
            "DISTRIBUTED.NUM_PROCS_PER_NODE",
            "did you mean DISTRIBUTED.NUM_PROC_PER_NODE?",
        ),
        # removed with VISSL's warm-up as the only one: refused by name, not silently ignored
        ("config.OPTIMIZER.WARMUP_SCHEDULE=zero_per_step", "OPTIMIZER.WARMUP_SCHEDULE", "unknown key"),
        ("config.PRETRAIN.OPTIMIZER.WARMUP_MULTI_NODE_ONLY=false", "PRETRAIN.OPTIMIZER.WARMUP_MULTI_NODE_ONLY", "key"),
    ],
)
def test_unknown_key_names_it_and_the_closest_valid_key(override: str, culprit: str, hint: str) -> None:
    stderr = error_of(cli("config", "show", "config=quickstart", override))
    assert f"{culprit}: unknown key" in stderr and hint in stderr


@pytest.mark.parametrize(
    "override, culprit, shown",
    [
        ("config.CLUSTERFIT.NUM_CLUSTERS=ten", "CLUSTERFIT.NUM_CLUSTERS", "'ten'"),
        ("config.CLUSTERFIT.L2_NORMALIZE=maybe", "CLUSTERFIT.L2_NORMALIZE", "'maybe'"),
        ("config.CLUSTERFIT.CLUSTER_BACKEND=sklearn", "CLUSTERFIT.CLUSTER_BACKEND", "'faiss' or 'torch'"),
        ("config.DATA.TRAIN.LABEL_PATHS=labels.npy", "DATA.TRAIN.LABEL_PATHS", "valid list"),
        ("config.CLUSTERFIT.NUM_CLUSTERS=1", "CLUSTERFIT.NUM_CLUSTERS", "greater than or equal to 2"),
    ],
)
def test_wrong_type_names_the_key(override: str, culprit: str, shown: str) -> None:
    stderr = error_of(cli("config", "show", "config=quickstart", override))
    assert f"{culprit}:" in stderr and shown in stderr


@pytest.mark.parametrize("name", ["no-such-config", "/nonexistent/folder/exp.yaml"])
def test_missing_config_file_names_it(name: str) -> None:
    stderr = error_of(cli("config", "show", f"config={name}"))
    assert f"config={name}: no such config file" in stderr


def test_missing_dataset_folder_names_it(tmp_path: Path) -> None:
    root = tmp_path / "exp"
    result = cli(
        "extract",
        "config=quickstart",
        "config.DATA.TRAIN.DATA_SOURCES=[disk_folder]",
        "config.DATA.TRAIN.DATA_PATHS=[/nonexistent/x]",
        "config.PIPELINE.STEPS=[extract]",
        f"config.EXPERIMENT.ROOT={root.as_uri()}",
        timeout=300,
    )
    stderr = error_of(result)
    assert result.returncode == 2
    assert "/nonexistent/x" in stderr and "DATA.TRAIN.DATA_PATHS" in stderr
    assert not list(root.rglob("_SUCCESS.json"))  # nothing was published


def test_bad_arguments_are_user_errors() -> None:
    assert "expected config=<name>" in error_of(cli("config", "show", "config=quickstart", "CLUSTERFIT.NUM_CLUSTERS"))
    assert "config.KEY.PATH=value" in error_of(cli("config", "show", "config=quickstart", "CLUSTERFIT.NUM_CLUSTERS=3"))


def test_bad_yaml_file_names_it(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("CLUSTERFIT: {NUM_CLUSTERS: [1, 2\n")
    assert f"{broken}: not valid YAML" in error_of(cli("config", "show", f"config={broken}"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("CLUSTERFIT:\n  N_ITERS: 3\n")
    stderr = error_of(cli("config", "show", f"config={unknown}"))
    assert "CLUSTERFIT.N_ITERS: unknown key (did you mean CLUSTERFIT.N_ITER?)" in stderr
