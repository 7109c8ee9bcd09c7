"""Process environment: rank discovery from `env://` variables, rank-aware logging, progress, and
waiting on other ranks through the artifact store.

torchrun and the PyTorchJob operator set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
(torchrun also LOCAL_RANK). All absent means one process; some present is an error. This module
imports no deep-learning library, so the cluster step (no torch in its image) uses it too.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from clusterfit.errors import UserError

if TYPE_CHECKING:
    from clusterfit.storage import Store

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class Interrupted(Exception):
    """A step stopped on request (SIGTERM) after saving its state; rerunning resumes it."""


# Set by the step manifests (clusterfit/kube/manifests.py) in a pod that was given GPUs: their number.
GPUS_ENV = "CLUSTERFIT_GPUS"
# The oldest Linux driver each CUDA major version of the pinned wheels runs on (NVIDIA's release notes).
MIN_DRIVER = {"12": "525.60.13", "13": "580.65.06"}


class GPUUnavailable(UserError, RuntimeError):
    """A pod that was given GPUs finds none: a step must not fall back to the CPU silently."""


def check_requested_gpus(found: int, library: str, cuda: str | None, detail: str = "") -> None:
    """Raise GPUUnavailable when this pod was given GPUs (GPUS_ENV) and `library` finds none.

    `cuda` is the CUDA version the library was built for; `detail` what it said (torch's warning
    about an old driver, say)."""
    requested = int(os.environ.get(GPUS_ENV, "0") or 0)
    if not requested or found:
        return
    major = (cuda or "").split(".")[0]
    driver = f"; {library}'s CUDA {cuda} needs an NVIDIA driver >= {MIN_DRIVER[major]}" if major in MIN_DRIVER else ""
    said = f" ({detail.strip()})" if detail.strip() else ""
    raise GPUUnavailable(
        f"this pod was given {requested} GPU(s) ({GPUS_ENV}={requested}, from KUBERNETES.RESOURCES.<STEP>.GPUS) but "
        f"{library} finds none{said}{driver}. Check the node's driver (`nvidia-smi`) and its NVIDIA device plugin; "
        "the step does not fall back to the CPU."
    )


class DistributedEnvError(UserError, RuntimeError):
    """The env:// variables are half set."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """This process's rank, world size and local rank; one process when none of the variables is set."""
    env = dict(os.environ if env is None else env)
    present = [name for name in ENV_VARS if name in env]
    if not present:
        return Ranks()
    missing = [name for name in ENV_VARS if name not in env]
    if missing:
        raise DistributedEnvError(
            f"half-set distributed environment: {', '.join(present)} set but {', '.join(missing)} missing "
            "(start through torchrun or the PyTorchJob operator, or unset them all for one process)"
        )
    try:
        ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError as exc:
        raise DistributedEnvError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers: {exc}") from exc
    if not 0 <= ranks.rank < ranks.world_size:
        raise DistributedEnvError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world_size}")
    return ranks


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = ranks_from_env_safe().rank
        return True


def ranks_from_env_safe() -> Ranks:
    try:
        return ranks_from_env()
    except DistributedEnvError:
        return Ranks()


def setup_logging(level: int = logging.INFO) -> None:
    """Log lines carry the time and the rank: `12:00:01 [rank 0] clusterfit.extract: ...`."""
    root = logging.getLogger()
    if any(getattr(h, "_clusterfit", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(_RankFilter())
    handler._clusterfit = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # faiss logs each instruction-set build it tries, failures included, at INFO: noise, not news.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


def progress(items: Iterable[T], total: int, desc: str, interval_s: float = 30.0, unit: str = "it") -> Iterator[T]:
    """Iterate with progress on rank 0 only: a tqdm bar on a terminal, else plain lines with rate and ETA."""
    if not ranks_from_env_safe().is_main:
        yield from items
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True)
        return
    log = logging.getLogger("clusterfit.progress")
    start = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= interval_s or done == total:
            rate = done / max(now - start, 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            log.info(
                "%s: %d/%d %s (%.1f%%), %.2f %s/s, ETA %s",
                desc,
                done,
                total,
                unit,
                100.0 * done / max(total, 1),
                rate,
                unit,
                _fmt_s(eta),
            )
            last = now


def _fmt_s(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{sec:02d}s" if hours else f"{minutes}m{sec:02d}s"


def wait_for_keys(store: Store, keys: list[str], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Block until every key exists in `store` (ranks coordinating without torch.distributed);
    raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    pending = list(keys)
    while pending:
        pending = [key for key in pending if not store.exists(key)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}: {store.uri(pending[0])} never appeared")
        time.sleep(poll_s)
