"""Step 2: training on cluster labels, resumed after kill -9, across two ranks, refusing bad labels."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli, run_ok, tiny_overrides

LIMIT = "config.DATA.TRAIN.DATA_LIMIT=256"


def args(root: Path | str, *extra: str) -> list[str]:
    return [*tiny_overrides(root), "config.PIPELINE.STEPS=[extract,cluster,train]", LIMIT, *extra]


def history(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "train/metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def clustered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Features and K=20 cluster labels of 256 digits, to copy into each test's root."""
    root = tmp_path_factory.mktemp("clustered") / "exp"
    run_ok("extract", *args(root))
    run_ok("cluster", *args(root))
    return root


def copy_of(clustered: Path, tmp_path: Path, name: str) -> Path:
    root = tmp_path / name
    shutil.copytree(clustered, root)
    return root


def test_kill_9_mid_training_resumes_and_matches_an_uninterrupted_run(clustered: Path, tmp_path: Path) -> None:
    epochs = "config.OPTIMIZER.NUM_EPOCHS=3"
    straight = copy_of(clustered, tmp_path, "straight")
    run_ok("train", *args(straight, epochs))
    killed = copy_of(clustered, tmp_path, "killed")
    proc = subprocess.Popen(
        [sys.executable, "-m", "clusterfit", "train", *args(killed, epochs)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = killed / "train/latest.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["epoch"] >= 1):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = json.loads(pointer.read_text())["epoch"]
    assert 1 <= at_kill < 3 and not (killed / "train/_SUCCESS.json").exists()
    resumed = run_ok("train", *args(killed, epochs))
    assert f"resuming from epoch {at_kill}" in resumed.stderr
    # Same seed, same data order and RNG state restored: the same numbers up to float reassociation.
    for a, b in zip(history(straight), history(killed), strict=True):
        assert a["epoch"] == b["epoch"] and a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["top1"] == pytest.approx(b["top1"], abs=0.5)


def test_two_process_ddp_loss_decreases_like_one_process(clustered: Path, tmp_path: Path) -> None:
    epochs = "config.OPTIMIZER.NUM_EPOCHS=4"
    one = copy_of(clustered, tmp_path, "one")
    run_ok("train", *args(one, epochs, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=64"))
    two = copy_of(clustered, tmp_path, "two")
    proc = run_ok(
        "train",
        *args(two, epochs, "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=32", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"),
    )
    assert "torch.distributed.run" in proc.stderr
    h1, h2 = history(one), history(two)
    assert h2[-1]["step"] == h1[-1]["step"] == 4 * 4  # same global batch of 64: 4 steps per epoch
    for h in (h1, h2):
        assert h[-1]["loss"] < 0.9 * h[0]["loss"]
    assert h2[-1]["loss"] == pytest.approx(h1[-1]["loss"], rel=0.25)


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.zeros(255, dtype=np.int64), "255 labels but the training dataset has 256 images"),
        (np.full(256, 25, dtype=np.int64), "label ids range 25..25, outside 0..19 (CLUSTERFIT.NUM_CLUSTERS=20)"),
        (np.zeros(256, dtype=np.float64), "labels must be integers (int64), got dtype float64"),
    ],
)
def test_bad_label_files_fail_before_training(tmp_path: Path, labels: np.ndarray, message: str) -> None:
    path = tmp_path / "labels.npy"
    np.save(path, labels)
    proc = cli("train", *args(tmp_path / "exp", f"config.DATA.TRAIN.LABEL_PATHS=[{path}]"))
    assert proc.returncode == 2
    assert str(path) in proc.stderr and message in proc.stderr
    assert not (tmp_path / "exp/train").exists()


def test_sigterm_writes_a_checkpoint_before_exiting(clustered: Path, tmp_path: Path) -> None:
    root = copy_of(clustered, tmp_path, "term")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clusterfit",
            "train",
            *args(
                root,
                "config.OPTIMIZER.NUM_EPOCHS=50",
                "config.CHECKPOINT.CHECKPOINT_FREQUENCY=100",
                "config.LOG.PROGRESS_INTERVAL_S=0.05",
            ),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "epoch 0:" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    pointer = json.loads((root / "train/latest.json").read_text())
    assert pointer["step"] > 0 and (root / "train" / pointer["checkpoint"]).exists()
    assert "stopped by SIGTERM" in err


def test_checkpoints_on_s3_move_the_latest_pointer(s3_server, s3_bucket: str, s3_env) -> None:  # type: ignore[no-untyped-def]
    root = f"{s3_bucket}/exp"
    run_ok(
        "run",
        *args(
            root,
            "config.CHECKPOINT.CHECKPOINT_ITER_FREQUENCY=3",
            "config.OPTIMIZER.NUM_EPOCHS=2",
            "config.EXTRACT.PARTITIONS=[TRAIN]",
        ),
        env=s3_server.env(),
    )
    from clusterfit.storage import open_store

    store = open_store(root, s3_server.settings())
    pointer = json.loads(store.get_bytes("train/latest.json"))
    checkpoints = store.list("train/checkpoints/")
    assert f"train/{pointer['checkpoint']}" in checkpoints and len(checkpoints) <= 2
    assert pointer["epoch"] == 2 and store.exists("train/_SUCCESS.json") and store.exists("train/final.pt")
