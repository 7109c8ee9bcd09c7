"""The quickstart end to end: `clusterfit run config=quickstart` in a temp dir, wall time per step.

    python bench/run.py                      # the whole quickstart (about ten minutes on 2 cores)
    python bench/run.py config.OPTIMIZER.NUM_EPOCHS=1 config.PRETRAIN.OPTIMIZER.NUM_EPOCHS=1   # shorter

Runs the command a user runs (in a fresh process, its working directory a new temp dir, so the
artifacts land in `<tmp>/runs/quickstart/`), polls its peak memory, and reads what it prints:
"Step wall times: ..." and the evaluation summary lines ("- ...").
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import common

STEP_TIME = re.compile(r"(\w+) ([\d.]+)s")


def run_quickstart(overrides: list[str], tmp: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "clusterfit", "run", "config=quickstart", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    with proc, common.PeakPoller(proc.pid) as poller:
        out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err[-3000:]}")
    return {
        "command": " ".join(cmd[1:]),
        "wall_s": wall,
        "peak_rss_mb": poller.peak / 2**20,
        "stdout": out,
        "stderr_tail": err[-3000:],
    }


def parse(stdout: str) -> tuple[dict[str, float], list[str]]:
    """{step: seconds} from the "Step wall times:" line, and the evaluation summary lines."""
    times: dict[str, float] = {}
    for line in stdout.splitlines():
        if line.startswith("Step wall times:"):
            times = {name: float(s) for name, s in STEP_TIME.findall(line.split(":", 1)[1])}
    verdicts = [line for line in stdout.splitlines() if line.startswith("- ")]
    return times, verdicts


def report(result: dict[str, Any], times: dict[str, float], verdicts: list[str], info: dict[str, Any]) -> str:
    total = sum(times.values())
    rows = [[step, seconds, f"{100 * seconds / total:.0f}%"] for step, seconds in times.items()]
    rows.append(["total (steps)", total, "100%"])
    rows.append(["process wall (start-up included)", result["wall_s"], "-"])
    return "\n".join(
        [
            f"quickstart benchmark on {common.hardware_line(info)}",
            f"`{result['command']}` in a temp dir; peak RSS {result['peak_rss_mb']:.0f} MB",
            "",
            common.table(["step", "wall s", "share"], rows),
            "",
            "Evaluation summary as printed:",
            *verdicts,
        ]
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config.A.B=value overrides passed to clusterfit run")
    args = parser.parse_args(argv)
    info = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        result = run_quickstart(args.overrides, tmp)
    times, verdicts = parse(result["stdout"])
    text = report(result, times, verdicts, info)
    print(text)
    payload = {"machine": info, "step_wall_s": times, "verdicts": verdicts, **result, "table": text}
    name = "run" if not args.overrides else "run-overridden"
    print(f"\nwrote {common.write_json(name, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
