"""The Python API a notebook uses, through the public names only: `import clusterfit`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import clusterfit


def test_the_public_names_are_the_documented_ones() -> None:
    steps = ["pretrain", "extract", "cluster", "train", "evaluate"]
    assert set(clusterfit.__all__) >= {"load_config", "run", "Config", "ConfigError", "UserError", *steps}
    assert all(callable(getattr(clusterfit, name)) for name in ["load_config", "run", *steps])


def test_importing_the_package_loads_no_torch() -> None:
    code = "import sys, clusterfit; assert not [m for m in sys.modules if m.startswith('torch')]"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_load_config_takes_a_name_and_dotted_or_section_overrides() -> None:
    cfg = clusterfit.load_config("quickstart", {"CLUSTERFIT.NUM_CLUSTERS": 30, "EXPERIMENT": {"SEED": 3}})
    assert cfg.CLUSTERFIT.NUM_CLUSTERS == 30 and cfg.EXPERIMENT.SEED == 3
    assert cfg.EXPERIMENT.NAME == "quickstart"  # the rest of the file stays
    assert clusterfit.load_config().CLUSTERFIT.NUM_CLUSTERS == 16000  # no name: the defaults
    with pytest.raises(clusterfit.ConfigError, match=r"CLUSTERFIT\.NUM_CLUSTER: unknown key"):
        clusterfit.load_config("quickstart", {"CLUSTERFIT.NUM_CLUSTER": 30})
    assert issubclass(clusterfit.ConfigError, clusterfit.UserError)


def test_steps_and_run_from_python(tmp_path: Path) -> None:
    overrides = {
        "EXPERIMENT.ROOT": tmp_path.as_uri(),
        "PIPELINE.STEPS": ["extract", "cluster"],
        "DATA.TRAIN.DATA_LIMIT": 128,
        "EXTRACT.PARTITIONS": ["TRAIN"],
        "CLUSTERFIT.NUM_CLUSTERS": 4,
        "CLUSTERFIT.N_ITER": 5,
    }
    cfg = clusterfit.load_config("quickstart", overrides)
    extracted = clusterfit.extract(cfg)
    assert not extracted.skipped and extracted.chunks_computed == 1
    clustered = clusterfit.cluster(cfg)
    assert not clustered.skipped and clustered.num_points == 128
    labels = np.load(tmp_path / clustered.folder / "labels.npy")
    assert labels.shape == (128,) and set(labels.tolist()) <= set(range(4))
    # The whole pipeline again: every step is already published with this config.
    again = clusterfit.run(cfg)
    assert again.ran == [] and again.skipped == ["extract", "cluster"]
