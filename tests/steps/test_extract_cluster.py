"""Step 1 end to end from the command line: extract then cluster on digits, a random ResNet-18."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli, run_ok, tiny_overrides
from tests.steps.helpers import features_from_disk, manifest

STEP1 = ["config.PIPELINE.STEPS=[extract,cluster]"]


def step1(root: Path | str, *extra: str) -> list[str]:
    return [*tiny_overrides(root), *STEP1, *extra]


@pytest.fixture(scope="module")
def step1_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One extract + cluster run shared by the read-only checks below."""
    root = tmp_path_factory.mktemp("step1") / "exp"
    run_ok("extract", *step1(root))
    run_ok("cluster", *step1(root))
    return root


def test_extract_then_cluster_publishes_the_contract(step1_root: Path) -> None:
    feats = manifest(step1_root / "features/train")
    assert feats["num_images"] == 1437 and feats["dims"] == {"res5": 512}
    assert feats["model"]["weights"]["uri"] == ""  # random init, recorded as such
    folder = step1_root / "clusters/res5-k20"
    out = manifest(folder)
    assert {"centroids.npy", "labels.npy", "distances.npy", "stats.json", "test/labels.npy"} <= set(out["files"])
    centroids, labels = np.load(folder / "centroids.npy"), np.load(folder / "labels.npy")
    assert centroids.shape == (20, 512) and centroids.dtype == np.float32
    assert labels.shape == (1437,) and labels.dtype == np.int64
    stats = json.loads((folder / "stats.json").read_text())
    assert sum(stats["sizes"]) == 1437 and len(stats["objective_per_iteration"]) == 10
    assert stats["empty_clusters"] == int((np.bincount(labels, minlength=20) == 0).sum())


@pytest.mark.parametrize("split,labels_name", [("train", "labels.npy"), ("test", "test/labels.npy")])
def test_labels_are_the_bruteforce_argmin_in_dataset_order(step1_root: Path, split: str, labels_name: str) -> None:
    index, feats = features_from_disk(step1_root, split, "res5")
    folder = step1_root / "clusters/res5-k20"
    centroids, labels = np.load(folder / "centroids.npy"), np.load(folder / labels_name)
    assert np.array_equal(index, np.arange(len(labels)))
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sq = ((unit[:, None, :].astype(np.float64) - centroids[None, :, :]) ** 2).sum(-1)
    oracle = sq.argmin(1)
    # Exact ties aside, the oracle and faiss agree everywhere; allow float-rounding near-ties only.
    disagree = np.flatnonzero(oracle != labels)
    gaps = sq[disagree, labels[disagree]] - sq[disagree, oracle[disagree]]
    assert len(disagree) <= 2 and np.all(gaps < 1e-5), (len(disagree), gaps)


def test_rerun_skips_published_steps(step1_root: Path) -> None:
    before = (step1_root / "clusters/res5-k20/_SUCCESS.json").stat().st_mtime_ns
    proc = run_ok("cluster", *step1(step1_root))
    assert "already published" in proc.stderr
    assert (step1_root / "clusters/res5-k20/_SUCCESS.json").stat().st_mtime_ns == before


def test_extract_and_cluster_on_s3(s3_server, s3_bucket: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = f"{s3_bucket}/exp1"
    env = s3_server.env()
    small = ("config.DATA.TRAIN.DATA_LIMIT=600", "config.EXTRACT.PARTITIONS=[TRAIN]")
    run_ok("extract", *step1(root, *small), env=env)
    run_ok("cluster", *step1(root, *small), env=env)
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    bucket = s3_bucket.removeprefix("s3://")
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="exp1/")["Contents"]}
    assert {
        "exp1/clusters/res5-k20/_SUCCESS.json",
        "exp1/clusters/res5-k20/labels.npy",
        "exp1/features/train/_SUCCESS.json",
    } <= keys
    labels = np.load(
        __import__("io").BytesIO(
            client.get_object(Bucket=bucket, Key="exp1/clusters/res5-k20/labels.npy")["Body"].read()
        )
    )
    assert labels.shape == (600,) and labels.min() >= 0 and labels.max() < 20


def test_two_processes_extract_the_same_features_as_one(tmp_path: Path, step1_root: Path) -> None:
    root = tmp_path / "two"
    run_ok("extract", *step1(root), "config.DISTRIBUTED.NUM_PROC_PER_NODE=2", "config.DATA.NUM_DATALOADER_WORKERS=0")
    parts = sorted((root / "features/train/res5").glob("part-*-index.npy"))
    assert {p.name.split("-")[1] for p in parts} == {"00000", "00001"}  # both ranks wrote parts
    index_2, feats_2 = features_from_disk(root, "train", "res5")
    index_1, feats_1 = features_from_disk(step1_root, "train", "res5")
    assert np.array_equal(index_2, np.arange(1437))  # every index exactly once, no padding
    np.testing.assert_allclose(feats_2, feats_1, rtol=1e-4, atol=1e-5)


def test_killed_extraction_resumes_at_the_first_unfinished_chunk(tmp_path: Path, step1_root: Path) -> None:
    root = tmp_path / "killed"
    small = ("config.EXTRACT.CHUNK_SIZE=32", "config.EXTRACT.PARTITIONS=[TRAIN]", "config.DATA.TRAIN.DATA_LIMIT=640")
    args = [sys.executable, "-m", "clusterfit", "extract", *step1(root, *small)]
    markers = root / "features/train/_chunks"
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(markers.glob("*.json"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in markers.glob("*.json")}
    assert 5 <= len(done) < 20, f"{len(done)} chunks done at the kill"
    assert not (root / "features/train/_SUCCESS.json").exists()  # nothing published half-way
    resumed = run_ok("extract", *step1(root, *small))
    assert f"{len(done)} of this rank's 20 chunks already done" in resumed.stderr
    for name, mtime in done.items():  # finished chunks were not recomputed
        assert (markers / name).stat().st_mtime_ns == mtime
    index, resumed_feats = features_from_disk(root, "train", "res5")
    _, full_feats = features_from_disk(step1_root, "train", "res5")
    assert np.array_equal(index, np.arange(640))
    np.testing.assert_allclose(resumed_feats, full_feats[:640], rtol=1e-4, atol=1e-5)


def test_a_changed_config_redoes_the_chunks_a_finished_extraction_left(tmp_path: Path) -> None:
    small = ("config.EXTRACT.PARTITIONS=[TRAIN]", "config.DATA.TRAIN.DATA_LIMIT=192", "config.EXTRACT.CHUNK_SIZE=64")
    root, fresh = tmp_path / "changed", tmp_path / "fresh"
    run_ok("extract", *step1(root, *small))
    _, before = features_from_disk(root, "train", "res5")
    other = "config.DATA.TRANSFORMS.MEAN=[0.3,0.3,0.3]"  # same chunks, other features
    again = run_ok("extract", *step1(root, *small, other))
    assert (
        "already done" not in again.stderr and "published 192 images" in again.stderr and "in 3 chunks" in again.stderr
    )
    run_ok("extract", *step1(fresh, *small, other))
    index, after = features_from_disk(root, "train", "res5")
    _, expected = features_from_disk(fresh, "train", "res5")
    assert np.array_equal(index, np.arange(192)) and not np.allclose(after, before)
    np.testing.assert_allclose(after, expected, rtol=1e-5, atol=1e-6)


def test_num_clusters_larger_than_data_fails_before_any_work(step1_root: Path) -> None:
    proc = cli("cluster", *step1(step1_root, "config.CLUSTERFIT.NUM_CLUSTERS=5000"))
    assert proc.returncode == 2
    assert "NUM_CLUSTERS=5000 is larger than the number of features (1437)" in proc.stderr
    assert not (step1_root / "clusters/res5-k5000").exists()


def test_few_points_per_cluster_warns(step1_root: Path) -> None:
    proc = run_ok("cluster", *step1(step1_root, "config.CLUSTERFIT.NUM_CLUSTERS=40", "config.CLUSTERFIT.N_ITER=2"))
    assert "fewer than 39" in proc.stderr


def test_features_of_another_layer_are_refused(step1_root: Path) -> None:
    proc = cli("cluster", *step1(step1_root, "config.CLUSTERFIT.FEATURES.LAYER_NAME=res4"))
    assert proc.returncode == 2
    assert "no features of layer 'res4'" in proc.stderr or "LAYER_NAME=res4" in proc.stderr


def test_nan_features_fail_naming_the_part(tmp_path: Path) -> None:
    root = tmp_path / "nan"
    small = ("config.EXTRACT.PARTITIONS=[TRAIN]", "config.DATA.TRAIN.DATA_LIMIT=600")
    run_ok("extract", *step1(root, *small))
    part = root / "features/train/res5/part-00000-000001.npy"
    feats = np.load(part)
    feats[3, 7] = np.nan
    np.save(part, feats)
    # Re-publish the manifest as a buggy upstream step would, so only the NaN check can catch it.
    man = manifest(root / "features/train")
    import hashlib

    data = part.read_bytes()
    man["files"]["res5/part-00000-000001.npy"].update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "features/train/_SUCCESS.json").write_text(json.dumps(man))
    proc = cli("cluster", *step1(root, *small))
    assert proc.returncode == 2
    assert "part-00000-000001.npy" in proc.stderr and "NaN" in proc.stderr


def test_an_altered_part_is_caught_by_the_manifest(tmp_path: Path) -> None:
    root = tmp_path / "altered"
    small = ("config.EXTRACT.PARTITIONS=[TRAIN]", "config.DATA.TRAIN.DATA_LIMIT=300")
    run_ok("extract", *step1(root, *small))
    part = root / "features/train/res5/part-00000-000000.npy"
    feats = np.load(part)
    np.save(part, feats * 2)
    proc = cli("cluster", *step1(root, *small))
    assert proc.returncode == 2
    assert "part-00000-000000.npy" in proc.stderr and "altered after publication" in proc.stderr
