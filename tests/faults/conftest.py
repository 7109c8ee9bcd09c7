"""Fixtures of the fault tests (marked `faults`): MinIO behind toxiproxy and a rule-driven HTTP front,
a clean reference run to compare with, and a check that no output carries the secret key.

They need MinIO and toxiproxy-server (`bash tests/infra/build_bins.sh node`) and root (the full-disk
test mounts a tmpfs), so they run after the node's preparation, beside the node tests:

    .venv/bin/python -m pytest -m faults tests/faults
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import cli, tiny_overrides
from tests.faults.infra import Front, MinIO, Toxiproxy, run_front, run_minio, run_toxiproxy

BUCKET = "faults"
STEP_FOLDERS = {
    "pretrain": "pretrain",
    "extract": "features",
    "cluster": "clusters",
    "train": "train",
    "evaluate": "eval",
}
# The folder whose _SUCCESS.json publishes the step's main output (small_overrides: 10 clusters of res5).
PUBLISHED = {**STEP_FOLDERS, "extract": "features/train", "cluster": "clusters/res5-k10"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect `faults` tests unless `-m` mentions the marker (they need the node's build and root)."""
    if "faults" in (config.getoption("markexpr") or ""):
        return
    deselected = [item for item in items if item.get_closest_marker("faults")]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if not item.get_closest_marker("faults")]


WEIGHTS = f"s3://{BUCKET}/rotnet/pretrain/final.pt"  # pretrained once per session (`reference`)


def small_overrides(root: str, **extra: Any) -> list[str]:
    """The tiny digits experiment cut smaller still: 192 training images in 4 chunks, 10 clusters,
    starting from the session's RotNet weights (every experiment names the same file, so published
    folders copied between experiments keep their inputs)."""
    base = {
        "PIPELINE.STEPS": "[extract,cluster,train,evaluate]",
        "MODEL.WEIGHTS_INIT.PARAMS_FILE": WEIGHTS,
        "DATA.TRAIN.DATA_LIMIT": 192,
        "DATA.TEST.DATA_LIMIT": 120,
        "EXTRACT.CHUNK_SIZE": 48,
        "CLUSTERFIT.NUM_CLUSTERS": 10,
        "EVALUATE.LOW_SHOT": "[1]",
        "EVALUATE.LOW_SHOT_DRAWS": 2,
        "EVALUATE.LINEAR_EPOCHS": 2,
        "STORAGE.S3.ADDRESSING_STYLE": "path",
    }
    base.update(extra)
    return tiny_overrides(root, **base)


@dataclass
class Faulty:
    """One test's view: a prefix in the bucket, the chain client -> toxiproxy -> front -> MinIO, and
    every output the test's commands produced (for the secret check)."""

    minio: MinIO
    toxiproxy: Toxiproxy
    front: Front
    proxy_url: str
    prefix: str
    outputs: list[str] = field(default_factory=list)

    @property
    def root(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def run(self, step: str, *extra: str, direct: bool = False, **overrides: Any) -> subprocess.CompletedProcess[str]:
        """`clusterfit <step>` on this prefix through the fault chain (or straight to MinIO)."""
        endpoint = self.minio.endpoint_url if direct else self.proxy_url
        env = self.minio.env(endpoint)
        started = time.monotonic()
        proc = cli(step, *small_overrides(self.root, **overrides), *extra, env=env, timeout=900)
        proc.elapsed_s = time.monotonic() - started  # type: ignore[attr-defined]
        self.outputs += [proc.stdout, proc.stderr]
        retries = retries_logged(proc.stderr)
        # One line per command for the results table (pytest -s shows them).
        took = f"{proc.elapsed_s:.1f} s"  # type: ignore[attr-defined]
        print(f"\nFAULTS | {self.prefix} | {step} | exit {proc.returncode} | {took} | {len(retries)} retry lines")
        return proc

    def burst(self, method: str, part: str, kind: str, hold_s: float, stream: str = "downstream", **attrs: Any) -> None:
        """At the first `method` request whose path holds `part`, a toxic of `kind` for hold_s seconds."""
        self.front.on(method, part, action=lambda: self.toxiproxy.window(kind, hold_s, stream, **attrs))

    def heal(self) -> None:
        """No more faults: every toxic and front rule gone (and the front's request record)."""
        self.toxiproxy.clear()
        self.front.clear()

    def copy_from(self, source_prefix: str, *steps: str) -> None:
        """Server-side copies of published step folders from another prefix (as if those steps ran here)."""
        s3 = self.minio.client()
        for step in steps:
            folder = STEP_FOLDERS[step]
            listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{source_prefix}/{folder}/")
            for item in listing.get("Contents", []):
                target = self.prefix + item["Key"][len(source_prefix) :]
                s3.copy_object(Bucket=BUCKET, Key=target, CopySource={"Bucket": BUCKET, "Key": item["Key"]})

    def manifest(self, step: str, prefix: str | None = None) -> dict[str, Any] | None:
        key = f"{prefix or self.prefix}/{PUBLISHED[step]}/_SUCCESS.json"
        s3 = self.minio.client()
        try:
            body = s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        except s3.exceptions.NoSuchKey:
            return None
        self.outputs.append(body.decode())
        return dict(json.loads(body))

    def object(self, key: str) -> bytes:
        return bytes(self.minio.client().get_object(Bucket=BUCKET, Key=f"{self.prefix}/{key}")["Body"].read())

    def json(self, key: str) -> Any:
        return json.loads(self.object(key))

    def checkpoint(self, key: str) -> dict[str, Any]:
        import io

        import torch

        return dict(torch.load(io.BytesIO(self.object(key)), map_location="cpu", weights_only=False))

    def keys(self, folder: str) -> list[str]:
        listing = self.minio.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{self.prefix}/{folder}/")
        return [item["Key"][len(self.prefix) + 1 :] for item in listing.get("Contents", [])]


@pytest.fixture(scope="session")
def minio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MinIO]:
    with run_minio(tmp_path_factory.mktemp("minio")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture(scope="session")
def chain(minio: MinIO, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Toxiproxy, Front, str]]:
    """toxiproxy -> front -> MinIO, started once."""
    upstream = minio.endpoint_url.removeprefix("http://")
    with run_front(upstream) as front, run_toxiproxy(tmp_path_factory.mktemp("toxiproxy")) as toxiproxy:
        proxy_url = toxiproxy.proxy(front.url.removeprefix("http://"))
        yield toxiproxy, front, proxy_url


@pytest.fixture(scope="session")
def reference(minio: MinIO, chain: tuple[Toxiproxy, Front, str]) -> Faulty:
    """The whole small pipeline run once straight against MinIO, without faults: what every faulty
    run must reproduce byte for byte."""
    toxiproxy, front, proxy_url = chain
    rotnet = Faulty(minio, toxiproxy, front, proxy_url, "rotnet")
    proc = rotnet.run("pretrain", direct=True, **{"PIPELINE.STEPS": "[pretrain]", "MODEL.WEIGHTS_INIT.PARAMS_FILE": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = Faulty(minio, toxiproxy, front, proxy_url, "reference")
    proc = ref.run("run", direct=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ref


@pytest.fixture
def faulty(request: pytest.FixtureRequest, minio: MinIO, chain: tuple[Toxiproxy, Front, str]) -> Iterator[Faulty]:
    toxiproxy, front, proxy_url = chain
    prefix = f"{request.node.name.replace('[', '-').replace(']', '')}-{os.getpid()}"
    faulty = Faulty(minio, toxiproxy, front, proxy_url, prefix)
    faulty.heal()
    yield faulty
    faulty.heal()


def retries_logged(stderr: str) -> list[str]:
    """The log lines of retries: botocore's attempts, s3transfer's body retries, our rounds."""
    return [
        line
        for line in stderr.splitlines()
        if "retrying" in line.lower() and ("clusterfit.s3" in line or "s3transfer" in line)
    ]


def files_of(manifest: dict[str, Any] | None) -> dict[str, str]:
    """name -> sha256 of a manifest's files: what must be byte-identical to the reference."""
    assert manifest is not None, "the step published nothing"
    return {name: entry["sha256"] for name, entry in manifest["files"].items()}


def assert_no_secret(faulty: Faulty, *more: str) -> int:
    """No output of the test (logs, errors, manifests, the bucket's objects) contains the secret key."""
    texts = faulty.outputs + list(more)
    s3 = faulty.minio.client()
    for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{faulty.prefix}/").get("Contents", []):
        if item["Size"] < 2_000_000:
            texts.append(s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().decode("latin-1"))
    secret = faulty.minio.secret_key
    leaks = [text for text in texts if secret in text]
    assert not leaks, f"the secret key appears in {len(leaks)} outputs, e.g. ...{leaks[0][:300]}"
    return len(texts)
