"""Rank discovery from the env:// variables that torchrun and the PyTorchJob operator set."""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterfit.runtime import DistributedEnvError, Ranks, ranks_from_env

# ---------------------------------------------------------------------------------------------
# Ranks from the env:// variables


def test_no_rank_variables_means_one_process() -> None:
    assert ranks_from_env({"PATH": "/bin"}) == Ranks(rank=0, world_size=1, local_rank=0)


def test_full_rank_variables() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456", "LOCAL_RANK": "1"}
    ranks = ranks_from_env(env)
    assert ranks == Ranks(rank=5, world_size=8, local_rank=1)
    assert ranks.distributed and not ranks.is_main


@pytest.mark.parametrize(
    "env, missing",
    [
        ({"RANK": "0"}, ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
        ({"RANK": "0", "WORLD_SIZE": "2"}, ["MASTER_ADDR", "MASTER_PORT"]),
        ({"MASTER_ADDR": "x", "MASTER_PORT": "1", "WORLD_SIZE": "2"}, ["RANK"]),
    ],
)
def test_half_set_environment_names_the_missing_variables(env: dict[str, str], missing: list[str]) -> None:
    with pytest.raises(DistributedEnvError) as err:
        ranks_from_env(env)
    print(err.value)
    message = str(err.value)
    assert "half-set" in message and "missing" in message
    named_missing = message[message.index(" but ") + len(" but ") : message.index(" missing")]
    assert named_missing.split(", ") == missing


@pytest.mark.parametrize("rank, world", [("2", "2"), ("7", "4"), ("-1", "4"), ("x", "4")])
def test_rank_outside_the_world_is_an_error(rank: str, world: str) -> None:
    with pytest.raises(DistributedEnvError) as err:
        ranks_from_env({"RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert "RANK" in str(err.value)


# GPUs: this machine has none, so a pod given GPUs without a working driver is reproduced for real.


def test_a_step_given_gpus_that_finds_none_fails_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterfit.distributed import init_distributed
    from clusterfit.runtime import GPUUnavailable

    init_distributed()  # no GPUs asked for: the CPU is fine
    monkeypatch.setenv("CLUSTERFIT_GPUS", "2")
    with pytest.raises(GPUUnavailable) as err:
        init_distributed()
    message = str(err.value)
    print(message)
    assert "given 2 GPU(s)" in message and "torch finds none" in message and "does not fall back to the CPU" in message
    import torch

    if torch.version.cuda:  # a CUDA build of torch: the driver it needs is named
        assert f"CUDA {torch.version.cuda} needs an NVIDIA driver >= " in message


def test_the_cluster_step_given_gpus_that_faiss_cannot_use_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from clusterfit.kmeans import faiss_gpus
    from clusterfit.runtime import GPUUnavailable

    assert faiss_gpus() == 0
    monkeypatch.setenv("CLUSTERFIT_GPUS", "1")
    with pytest.raises(GPUUnavailable, match=r"given 1 GPU\(s\).*faiss 1\.\d+\.\d+ finds none"):
        faiss_gpus()


def test_the_cli_says_so_in_one_line(tmp_path: Path) -> None:
    from tests.conftest import cli, error_of, tiny_overrides

    proc = cli("extract", *tiny_overrides(tmp_path / "exp"), env={"CLUSTERFIT_GPUS": "8"})
    assert "given 8 GPU(s)" in error_of(proc)
    assert not (tmp_path / "exp" / "features").exists()
