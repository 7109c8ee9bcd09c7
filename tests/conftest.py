"""Shared fixtures: a tiny experiment config, the CLI as a subprocess, a real S3 server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from clusterfit.config import Config, config_from_args
from clusterfit.storage import Store, open_store

if TYPE_CHECKING:
    from tests.s3server import S3Server

REPO = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.s3server"]


def tiny_overrides(root: Path | str, **extra: Any) -> list[str]:
    """config.X=v arguments for a fast digits experiment rooted at `root`."""
    args = [
        "config=quickstart",
        f"config.EXPERIMENT.ROOT={root if str(root).startswith(('s3://', 'file://')) else Path(root).as_uri()}",
        "config.PRETRAIN.OPTIMIZER.NUM_EPOCHS=1",
        "config.OPTIMIZER.NUM_EPOCHS=2",
        "config.EVALUATE.LINEAR_EPOCHS=3",
        "config.CLUSTERFIT.NUM_CLUSTERS=20",
        "config.CLUSTERFIT.N_ITER=10",
        "config.EXTRACT.CHUNK_SIZE=256",
        "config.LOG.PROGRESS_INTERVAL_S=1",
    ]
    return args + [f"config.{k}={v}" for k, v in extra.items()]


def tiny_config(root: Path | str, **extra: Any) -> Config:
    return config_from_args(tiny_overrides(root, **extra))


def cli(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """`python -m clusterfit ARGS` in a subprocess (what a user runs), output captured."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        full_env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "clusterfit", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_of(result: subprocess.CompletedProcess[str]) -> str:
    """The user-facing error of a failed CLI run: non-zero exit, one `clusterfit: error:` line, no traceback."""
    assert result.returncode != 0, result.stdout
    assert "clusterfit: error:" in result.stderr and "Traceback" not in result.stderr, result.stderr
    print(result.stderr.strip())
    return str(result.stderr)


def run_ok(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cli(...)` that must exit 0; the failure shows the end of its stderr."""
    proc = cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Captured output as text a pytest-xdist worker can send: a file name that is not UTF-8 (the
    fuzz tests make them) reaches the log as surrogate escapes, which would crash the worker."""
    outcome = yield
    report = outcome.get_result()
    report.sections = [
        (title, text.encode("utf-8", "backslashreplace").decode("utf-8")) for title, text in report.sections
    ]


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same tests on both backends: a local folder and a prefix of a fresh bucket."""
    if request.param == "file":
        return open_store((tmp_path / "root").as_uri())
    server: S3Server = request.getfixturevalue("s3_env")
    bucket: str = request.getfixturevalue("s3_bucket")
    return open_store(f"{bucket}/exp", server.settings())


@pytest.fixture
def tmp_root(tmp_path: Path) -> Path:
    root = tmp_path / "exp"
    root.mkdir()
    return root
