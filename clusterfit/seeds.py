"""Several training seeds (EXPERIMENT.SEEDS): the pipeline once per seed, then one summary over them.

    clusterfit run config=fashion-mnist                       # EXPERIMENT.SEEDS: [0, 1, 2]
    clusterfit run config=quickstart config.EXPERIMENT.SEEDS=[0,1,2]

Each seed is a whole experiment of its own under `<ROOT>/seed-<seed>` (EXPERIMENT.SEED set, so
pretraining, k-means and training all draw differently; the test images and the labelled low-shot
subsets drawn from them differ only with the seed too). `<ROOT>/summary/` then holds
`metrics.json` (each row's metrics as mean ± std over seeds, and per comparison the combined
verdict of `probes.combine_seeds`), `report.md`, `report.html` and, in a sweep, the K plot of the
means. Like a step, the summary is published by its `_SUCCESS.json` and skipped when its inputs
(every seed's eval manifest) have not changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clusterfit import artifacts, report
from clusterfit.artifacts.layout import EVAL, EVAL_METRICS, REPORT_HTML, SUMMARY
from clusterfit.config import Config
from clusterfit.probes import combine_seeds, mean_rows, sample_std
from clusterfit.storage import open_store

log = logging.getLogger(__name__)


@dataclass
class SummaryResult:
    folder: str
    skipped: bool
    report_uri: str
    summary: list[str] = field(default_factory=list, repr=False)  # the verdict lines


def seed_folder(seed: int) -> str:
    """Where one seed's experiment lives, relative to EXPERIMENT.ROOT (Config.with_seed roots it there)."""
    return f"seed-{seed}"


def summarize(cfg: Config) -> SummaryResult:
    """`<ROOT>/summary/` from every seed's published `eval/`."""
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    runs, inputs = [], {}
    for seed in cfg.EXPERIMENT.SEEDS:
        folder = f"{seed_folder(seed)}/{EVAL}"
        manifest = artifacts.read_manifest(store, folder)
        runs.append(artifacts.load_json(store, folder, EVAL_METRICS, manifest))
        inputs[seed_folder(seed)] = str(manifest["_digest"])
    tree = {"SEEDS": cfg.EXPERIMENT.SEEDS, "SIGNIFICANCE": cfg.EVALUATE.SIGNIFICANCE}
    fp = artifacts.fingerprint("summary", tree, inputs)
    report_uri = store.uri(f"{SUMMARY}/{REPORT_HTML}")
    if artifacts.skip_if_published(store, SUMMARY, fp, "summary"):
        metrics = artifacts.load_json(store, SUMMARY, EVAL_METRICS, artifacts.read_manifest(store, SUMMARY))
        return SummaryResult(SUMMARY, True, report_uri, report.seeds_summary_lines(metrics))
    started = time.time()
    metrics = summary_metrics(cfg, runs)
    ledger = artifacts.Ledger(store, SUMMARY)
    ledger.put_json(EVAL_METRICS, metrics)
    report.write_seeds(cfg, ledger, metrics)
    config = cfg.model_dump(mode="json")
    artifacts.publish(ledger, step="summary", config=config, inputs=inputs, fingerprint_=fp, started_s=started)
    log.info("summary over seeds %s: report at %s", cfg.EXPERIMENT.SEEDS, report_uri)
    return SummaryResult(SUMMARY, False, report_uri, report.seeds_summary_lines(metrics))


def summary_metrics(cfg: Config, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' metrics.json combined: rows as mean ± std, verdicts combined, cluster agreement averaged."""
    metrics: dict[str, Any] = {
        "seeds": cfg.EXPERIMENT.SEEDS,
        "protocol": runs[0].get("protocol", "quick"),
        "rows": mean_rows(runs),
        "comparison": combine_seeds(runs, cfg.EVALUATE.SIGNIFICANCE),
        "significance": cfg.EVALUATE.SIGNIFICANCE,
        "n_train": runs[0]["n_train"],
        "n_test": runs[0]["n_test"],
        "clusters": {split: mean_agreement([r["clusters"][split] for r in runs]) for split in runs[0]["clusters"]},
    }
    if runs[0].get("sweep"):
        by_k: dict[int, list[dict[str, Any]]] = {}
        for run in runs:
            for entry in run["sweep"]:
                by_k.setdefault(entry["k"], []).append(entry["TRAIN"])
        metrics["sweep"] = [{"k": k, "TRAIN": mean_agreement(found)} for k, found in by_k.items()]
    return metrics


def mean_agreement(found: list[dict[str, float]]) -> dict[str, float]:
    """NMI and ARI as the mean over seeds, with their sample std."""
    nmi, ari = np.array([f["nmi"] for f in found]), np.array([f["ari"] for f in found])
    return {"nmi": float(nmi.mean()), "ari": float(ari.mean()), "nmi_std": sample_std(nmi), "ari_std": sample_std(ari)}
