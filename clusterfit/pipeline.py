"""`clusterfit run`: every step of PIPELINE.STEPS in order, in this process.

    clusterfit run config=quickstart

Each step skips itself when its `_SUCCESS.json` matches its config and inputs, and resumes when
it died (extract by chunk, pretrain/train by checkpoint). A rerun of a finished run does no work
and says so. On Kubernetes the controller runs the same steps, one PyTorchJob each.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field

from clusterfit.config import Config
from clusterfit.layout import EVAL
from clusterfit.storage import open_store

log = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    report_uri: str = ""


def step_skipped(result: object) -> bool:
    """Whether a step's result says it did no work."""
    if hasattr(result, "skipped_steps"):  # extract: one entry per split it skipped
        return not getattr(result, "chunks_computed", 0) and bool(result.skipped_steps)
    return bool(getattr(result, "skipped", False))


def run_pipeline(cfg: Config) -> PipelineResult:
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    log.info("run: experiment %s, steps %s, artifacts at %s", cfg.EXPERIMENT.NAME, " -> ".join(cfg.PIPELINE.STEPS), store.uri())
    if "evaluate" in cfg.PIPELINE.STEPS:
        importlib.import_module("clusterfit.evaluate").preflight(cfg)
    result = PipelineResult()
    for step in cfg.PIPELINE.STEPS:
        started = time.perf_counter()
        outcome = importlib.import_module(f"clusterfit.{step}").run(cfg)
        result.wall_s[step] = time.perf_counter() - started
        (result.skipped if step_skipped(outcome) else result.ran).append(step)
        log.info("run: %s %s in %.1fs", step, "skipped (already done)" if step in result.skipped else "done", result.wall_s[step])
    if not result.ran:
        print(f"Nothing to do: all {len(result.skipped)} steps are already done with this config ({store.uri()}).")
    else:
        print(f"Ran {', '.join(result.ran)}" + (f"; skipped {', '.join(result.skipped)} (already done)" if result.skipped else "") + ".")
    print("Step wall times: " + ", ".join(f"{s} {t:.1f}s" for s, t in result.wall_s.items()))
    if "evaluate" in cfg.PIPELINE.STEPS:
        result.report_uri = store.uri(f"{EVAL}/report.html")
        print(f"Report: {result.report_uri}")
        summary = store.get_bytes(f"{EVAL}/report.md").decode().split("## Evaluation")[0]
        print("\n".join(line for line in summary.splitlines() if line.startswith(("- ", "Summary: "))))
    return result
