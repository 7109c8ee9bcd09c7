"""A `file://` experiment root whose disk fills up in the middle of extraction (a small tmpfs)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, error_of
from tests.faults.conftest import BUCKET, WEIGHTS, Faulty, files_of, small_overrides

pytestmark = pytest.mark.faults
ROOM_FOR_CHUNKS = 2  # the disk holds about two chunks' parts (48 x 512 float32 each) and then is full


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the test (root needed, as for the node tests)."""
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a tmpfs: run the fault tests as root (make test does)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_mid_extraction_fails_naming_the_file_and_a_rerun_finishes(
    reference: Faulty, small_disk: Path, tmp_path: Path
) -> None:
    weights = tmp_path / "rotnet.pt"  # the session's pretrained network, outside the small disk
    reference.minio.client().download_file(BUCKET, WEIGHTS.removeprefix(f"s3://{BUCKET}/"), str(weights))
    root = small_disk / "exp"
    args = small_overrides(root.as_uri(), **{"MODEL.WEIGHTS_INIT.PARAMS_FILE": str(weights)})
    part_bytes = 48 * 512 * 4
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    ballast = small_disk / "ballast"
    ballast.write_bytes(b"\0" * (free - int((ROOM_FOR_CHUNKS + 0.5) * part_bytes)))

    full = cli("extract", *args)
    error = error_of(full)
    assert "no space left on the device" in error and f"{root.as_uri()}/features/" in error
    features = root / "features" / "train"
    assert not (features / "_SUCCESS.json").exists()
    leftovers = [p.name for p in features.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers  # no half-written temporaries left on the full disk
    done = sorted(p.name for p in (features / "_chunks").iterdir())
    print(f"{error.strip()}\nchunks done before the disk filled: {done}")
    assert 1 <= len(done) < 4

    ballast.unlink()  # space again
    rerun = cli("extract", *args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done)} of this rank's 4 chunks already done" in rerun.stderr, rerun.stderr[-3000:]
    ours = json.loads((features / "_SUCCESS.json").read_text())
    assert files_of(ours) == files_of(reference.manifest("extract"))
