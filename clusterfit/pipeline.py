"""`clusterfit run`: every step of PIPELINE.STEPS in order, in this process.

    clusterfit run config=quickstart

Each step skips itself when its `_SUCCESS.json` matches its config and inputs, and resumes when
it died (extract by chunk, pretrain/train by checkpoint). A rerun of a finished run does no work
and says so. On Kubernetes the controller runs the same steps, one PyTorchJob each.
With EXPERIMENT.SEEDS, the steps run once per seed, each seed under `<ROOT>/seed-<seed>`, and a
summary over the seeds follows (clusterfit/seeds.py). The command line holds the experiment's
lease meanwhile (clusterfit/lease.py); a run that lost it stops before its next step.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from clusterfit.artifacts.layout import EVAL, REPORT_HTML
from clusterfit.config import Config
from clusterfit.storage import open_store

if TYPE_CHECKING:
    from clusterfit.lease import Lease
    from clusterfit.steps.evaluate import EvalResult

log = logging.getLogger(__name__)


class StepResult(Protocol):
    """What every step's `run` returns: at least whether it did no work."""

    @property
    def skipped(self) -> bool: ...


@dataclass
class PipelineResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    wall_s: dict[str, float] = field(default_factory=dict)
    report_uri: str = ""
    summary: list[str] = field(default_factory=list)  # evaluate's verdict lines


def run_step(step: str, cfg: Config) -> StepResult:
    """`clusterfit.steps.<step>.run(cfg)`, imported only when it runs (the cluster image has no torch)."""
    result: StepResult = importlib.import_module(f"clusterfit.steps.{step}").run(cfg)
    return result


def run_pipeline(cfg: Config, lease: Lease | None = None) -> PipelineResult:
    """PIPELINE.STEPS in order; with EXPERIMENT.SEEDS, all of them once per seed, then the summary over seeds.
    `lease`: the experiment's, checked before each step."""
    if "evaluate" in cfg.PIPELINE.STEPS:
        importlib.import_module("clusterfit.steps.evaluate").preflight(cfg)
    if not cfg.EXPERIMENT.SEEDS:
        result = run_steps(cfg, lease)
        print_outcome(result, cfg.EXPERIMENT.root_uri)
        return result
    result = PipelineResult()
    for seed in cfg.EXPERIMENT.SEEDS:
        log.info("run: seed %d of EXPERIMENT.SEEDS %s", seed, cfg.EXPERIMENT.SEEDS)
        one = run_steps(cfg.with_seed(seed), lease)
        result.ran += [f"{step} (seed {seed})" for step in one.ran]
        result.skipped += [f"{step} (seed {seed})" for step in one.skipped]
        result.wall_s |= {f"{step} (seed {seed})": t for step, t in one.wall_s.items()}
    if "evaluate" in cfg.PIPELINE.STEPS:
        if lease is not None:
            lease.check()
        started = time.perf_counter()
        summary = importlib.import_module("clusterfit.seeds").summarize(cfg)
        result.wall_s["summary"] = time.perf_counter() - started
        (result.skipped if summary.skipped else result.ran).append("summary")
        result.report_uri, result.summary = summary.report_uri, summary.summary
    print_outcome(result, cfg.EXPERIMENT.root_uri)
    return result


def run_steps(cfg: Config, lease: Lease | None = None) -> PipelineResult:
    """One experiment's steps, in order, in this process; none after `lease` was lost."""
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    steps = cfg.PIPELINE.STEPS
    log.info("run: experiment %s, steps %s, artifacts at %s", cfg.EXPERIMENT.NAME, " -> ".join(steps), store.uri())
    result = PipelineResult()
    for step in steps:
        if lease is not None:
            lease.check()
        started = time.perf_counter()
        outcome = run_step(step, cfg)
        result.wall_s[step] = time.perf_counter() - started
        (result.skipped if outcome.skipped else result.ran).append(step)
        done = "skipped (already done)" if outcome.skipped else "done"
        log.info("run: %s %s in %.1fs", step, done, result.wall_s[step])
        if step == "evaluate":
            result.summary = cast("EvalResult", outcome).summary
            result.report_uri = store.uri(f"{EVAL}/{REPORT_HTML}")
    return result


def print_outcome(result: PipelineResult, root_uri: str) -> None:
    """What a user reads at the end of `clusterfit run`: what ran, how long, the report and its verdict."""
    if not result.ran:
        print(f"Nothing to do: all {len(result.skipped)} steps are already done with this config ({root_uri}).")
    else:
        skipped = f"; skipped {', '.join(result.skipped)} (already done)" if result.skipped else ""
        print(f"Ran {', '.join(result.ran)}{skipped}.")
    print("Step wall times: " + ", ".join(f"{s} {t:.1f}s" for s, t in result.wall_s.items()))
    if result.report_uri:
        print(f"Report: {result.report_uri}")
        print("\n".join(result.summary))
