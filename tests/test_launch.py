"""clusterfit.launch: a step pod's first process exits 128+N on signal N (143 on SIGTERM), which the
training operator's restartPolicy ExitCode retries, where torchrun alone exits 1 (permanent); and
DISTRIBUTED.TIMEOUT_S reaches init_process_group and the pods' torchrun command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed

from clusterfit import launch
from clusterfit.config import config_from_args
from clusterfit.kube.manifests import step_command
from clusterfit.steps import extract

WORKER = """
import os, sys, time
open(os.path.join(sys.argv[1], "rank" + os.environ["RANK"]), "w").close()
time.sleep(600)
"""


def sigterm_once_workers_run(command: list[str], folder: Path) -> subprocess.CompletedProcess[str]:
    """Run `command` (a torchrun of two workers that sleep), SIGTERM it once both workers have started, as
    the kubelet does on preemption; return what it did."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not all((folder / f"rank{r}").exists() for r in (0, 1)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.parametrize("launcher", ["clusterfit.launch", "torch.distributed.run"])
def test_torchrun_stopped_by_sigterm_exits_143_under_the_launcher_and_1_alone(launcher: str, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    prefix = [sys.executable, "-m", launcher] + (["torchrun"] if launcher == "clusterfit.launch" else [])
    done = sigterm_once_workers_run(
        [*prefix, "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)], tmp_path
    )
    print(launcher, "exit code", done.returncode, done.stderr.strip().splitlines()[-1])
    if launcher == "clusterfit.launch":
        assert done.returncode == 143 and "stopped by SIGTERM; exit code 143" in done.stderr, done.stderr
    else:  # the oracle for why the launcher exists: torchrun's own exit on SIGTERM is 1, a "real error"
        assert done.returncode == 1 and "SignalException" in done.stderr, done.stderr


def test_a_one_process_step_stopped_by_a_signal_exits_128_plus_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def step(args: list[str]) -> int:
        os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends; Python as PID 1 would ignore it unhandled
        time.sleep(5)
        return 0

    monkeypatch.setattr(launch, "PROGRAMS", {"clusterfit": step})
    previous = {s: signal.getsignal(s) for s in launch.SIGNALS}
    try:
        assert launch.main(["clusterfit", "extract"]) == 143
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert launch.main(["bash", "-c", "exit 1"]) == 2  # only clusterfit and torchrun run in-process


class Joined(Exception):
    pass


def test_distributed_timeout_reaches_init_process_group_and_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}

    def init_process_group(backend: str, init_method: str, timeout: object) -> None:
        seen["timeout_s"] = timeout.total_seconds()  # type: ignore[attr-defined]
        raise Joined

    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.distributed, "init_process_group", init_process_group)
    cfg = config_from_args(["config=quickstart", "config.DISTRIBUTED.TIMEOUT_S=42"])
    with pytest.raises(Joined):
        extract.run(cfg)
    assert seen == {"timeout_s": 42.0}
    assert config_from_args(["config=quickstart"]).DISTRIBUTED.TIMEOUT_S == 600.0  # not torch's 1800

    pods = config_from_args(
        ["config=kubernetes-example", "config.DISTRIBUTED.NUM_NODES=2", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2"]
        + ["config.DISTRIBUTED.TIMEOUT_S=90"]
    )
    command = step_command(pods, "train")
    assert command[:4] == ["python", "-m", "clusterfit.launch", "torchrun"]
    assert "--rdzv-conf=timeout=90" in command
    assert command[-3:] == ["train", "config=/etc/clusterfit/config.yaml", "--no-lease"]
    assert step_command(pods, "cluster") == [
        "python",
        "-m",
        "clusterfit.launch",
        "clusterfit",
        "cluster",
        "config=/etc/clusterfit/config.yaml",
        "--no-lease",
    ]
