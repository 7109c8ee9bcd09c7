"""A step pod's first process: runs the step (or torchrun) in this interpreter and, stopped by signal N,
exits 128+N as a process killed by it would.

    python -m clusterfit.launch clusterfit extract config=/etc/clusterfit/config.yaml --no-lease
    python -m clusterfit.launch torchrun --nnodes=1 --nproc-per-node=2 -m clusterfit extract config=...

Why: with restartPolicy ExitCode the training operator recreates a pod whose container exited with 128
or more (the kubelet's SIGTERM on preemption, a node drain) and fails the job at once on any other code
(a real error). torchrun turns SIGTERM into a SignalException, stops its workers and exits 1, so a
preempted multi-process step would count as failed for good; and Python as a container's PID 1 ignores
SIGTERM unless it handles it, so a one-process step would sit out the grace period until SIGKILL. Here
both exit 143 as soon as the step has stopped (the train step still writes its checkpoint first).
The manifests (clusterfit/kube/manifests.py) start every step pod this way. torch is imported only for
torchrun: the cluster image has none.
"""

from __future__ import annotations

import runpy
import signal
import sys
from types import FrameType

SIGNALS = (signal.SIGTERM, signal.SIGINT)
USAGE = "usage: python -m clusterfit.launch {clusterfit|torchrun} ARGS..."


class Signalled(BaseException):
    """Signal `signum` arrived. A BaseException, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Signalled(signum)


def run_torchrun(args: list[str]) -> int:
    """torch.distributed.run's main with `args`; its SignalException (torchrun's own handlers, installed
    once the workers start) becomes Signalled."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException

    try:
        torchrun.main(args)
    except SignalException as exc:
        raise Signalled(int(exc.sigval)) from None
    return 0


def run_clusterfit(args: list[str]) -> int:
    """`python -m clusterfit ARGS`, in this interpreter (the command line stays the top of the imports)."""
    sys.argv = ["clusterfit", *args]
    try:
        runpy.run_module("clusterfit", run_name="__main__", alter_sys=True)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    return 0


PROGRAMS = {"clusterfit": run_clusterfit, "torchrun": run_torchrun}


def exit_code(signum: int) -> int:
    """What a shell and the kubelet report for a process killed by `signum`: 143 for SIGTERM."""
    return 128 + signum


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PROGRAMS:
        print(USAGE, file=sys.stderr)
        return 2
    for signum in SIGNALS:  # until torchrun installs its own (which raise SignalException)
        signal.signal(signum, _raise)
    try:
        return PROGRAMS[argv[0]](argv[1:])
    except Signalled as exc:
        code = exit_code(exc.signum)
        print(f"clusterfit.launch: {exc}; exit code {code} (the operator retries it)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
