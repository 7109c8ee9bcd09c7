"""What every benchmark shares: the machine's description, its float32 GEMM rate, methods run one
per child process with their peak memory, medians, one printed table and one JSON file.

Each method runs in a fresh child process (`python bench/<script>.py --child NAME --params JSON`)
so its peak memory is its own: the parent polls the RSS of the child and of the child's own
children (DataLoader workers) every POLL_S seconds, and the child reports its own `ru_maxrss`.
The child prints its figures as the last stdout line, after RESULT_TAG.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_TAG = "BENCH-RESULT "
POLL_S = 0.02
Method = Callable[[dict[str, Any]], dict[str, Any]]


# ---- the machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def blas_info() -> list[dict[str, Any]]:
    """The BLAS/OpenMP libraries loaded in this process (threadpoolctl), with their kernels and threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keep = ("internal_api", "prefix", "version", "architecture", "num_threads", "threading_layer")
    return [{k: lib.get(k) for k in keep} for lib in threadpool_info()]


def machine_info() -> dict[str, Any]:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {
            name: package_version(name) for name in ("numpy", "torch", "torchvision", "faiss-cpu", "scikit-learn")
        },
        "env": {
            k: os.environ[k]
            for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "MKL_NUM_THREADS")
            if k in os.environ
        },
    }


def hardware_line(info: dict[str, Any]) -> str:
    v = info["versions"]
    return (
        f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; load at start "
        f"{info['load_average_at_start']}; "
        f"numpy {v['numpy']}, torch {v['torch']}, faiss-cpu {v['faiss-cpu']}, scikit-learn {v['scikit-learn']}"
    )


def gemm_rate(size: int = 4096, repeats: int = 4) -> dict[str, float]:
    """Best-of-`repeats` float32 (size x size) @ (size x size) GFLOP/s with torch.mm and with numpy."""
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((size, size), dtype=np.float32), rng.standard_normal((size, size), dtype=np.float32)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    flop = 2.0 * size**3
    rates: dict[str, float] = {}
    for name, fn in (("torch_mm", lambda: torch.mm(ta, tb)), ("numpy", lambda: a @ b)):
        fn()  # warm-up: thread pools, page faults
        times = [clocked(fn) for _ in range(repeats)]
        rates[f"{name}_gflops"] = flop / min(t["seconds"] for t in times) / 1e9
        rates[f"{name}_gflops_per_cpu_s"] = flop / min(t["cpu_s"] for t in times) / 1e9
    rates["best_gflops"] = max(rates["torch_mm_gflops"], rates["numpy_gflops"])
    rates["best_gflops_per_cpu_s"] = max(rates["torch_mm_gflops_per_cpu_s"], rates["numpy_gflops_per_cpu_s"])
    return rates


def clocked(fn: Callable[[], Any]) -> dict[str, float]:
    clock = Clock()
    fn()
    return clock.read()


class Clock:
    """Wall and process CPU seconds (all threads) since it was made: CPU time is less disturbed by
    other work on a shared machine, though spinning OpenMP threads count in it too."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        return {"seconds": time.perf_counter() - self.wall0, "cpu_s": time.process_time() - self.cpu0}


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---- methods in child processes -----------------------------------------------------------------


def tree_rss_bytes(pid: int) -> int:
    """RSS of a process plus its descendants (shared pages of forked workers count once per process)."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class PeakPoller:
    """Polls a process tree's RSS in a thread; `.peak` is the largest sum seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.pid))
            self._stop.wait(POLL_S)

    def __enter__(self) -> PeakPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_child(
    script: str, method: str, params: dict[str, Any], timeout_s: float = 3600, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `method` of `script` in a fresh process; its figures plus `peak_rss_mb` (tree, polled)."""
    cmd = [sys.executable, script, "--child", method, "--params", json.dumps(params)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    with proc, PeakPoller(proc.pid) as poller:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise RuntimeError(f"{method}: no result within {timeout_s:.0f}s; stderr tail:\n{err[-3000:]}") from None
    lines = [line for line in out.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{method}: child exited {proc.returncode}; stderr tail:\n{err[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1][len(RESULT_TAG) :])
    result["peak_rss_mb"] = poller.peak / 2**20
    result["stderr_tail"] = err[-2000:]
    return result


def child_main(methods: dict[str, Method], argv: Sequence[str]) -> bool:
    """In a child (`--child NAME`): run that method and print its figures; False when not a child."""
    if "--child" not in argv:
        return False
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", required=True, choices=sorted(methods))
    parser.add_argument("--params", required=True)
    args = parser.parse_args(argv)
    result = methods[args.child](json.loads(args.params))
    result["child_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(RESULT_TAG + json.dumps(result), flush=True)
    return True


def rss_mb() -> float:
    """This process's current RSS (to tell a method's own memory from the interpreter and imports)."""
    import psutil

    return float(psutil.Process().memory_info().rss / 2**20)


# ---- figures, tables, JSON ----------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        magnitude = abs(value)
        if magnitude >= 1e5:
            return f"{value:.4g}"
        if magnitude >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def table(columns: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table (pastes into the README as it is)."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(columns), "| " + " | ".join("-" * w for w in widths) + " |", *(line(r) for r in cells)])


def write_json(script: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{script}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "MISSED")


def targets_table(targets: list[dict[str, Any]]) -> str:
    """The target / figure / verdict table that closes each model benchmark's report."""
    return table(["target", "figure", "verdict"], [[t["target"], t["figure"], verdict(t["met"])] for t in targets])


def model_parser(doc: str | None, quick_help: str, methods: list[str]) -> argparse.ArgumentParser:
    """The flags the model benchmarks (extract, train) share; each adds its own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=methods, choices=methods)
    return parser


def publish(
    name: str, args: Any, info: dict[str, Any], summary: dict[str, Any], text: str, targets: list[dict[str, Any]]
) -> None:
    """Print the table and write the same figures as JSON (`<name>-quick.json` for --quick runs)."""
    print(text)
    payload = {"machine": info, "settings": vars(args), "methods": summary, "targets": targets, "table": text}
    print(f"\nwrote {write_json(f'{name}-quick' if args.quick else name, payload)}", file=sys.stderr)
