"""The run report: what people would rather see than read.

Cluster-size histogram, example images per cluster (nearest to the centroid first), training
curves, and the evaluation table with a plain verdict per metric. Written next to
`eval/metrics.json` as `report.md`, `report.html` and PNGs, through the artifact ledger.
"""

from __future__ import annotations

import html
import io
import json
from typing import Any

import numpy as np

from clusterfit import artifacts
from clusterfit.artifacts.layout import (
    CLUSTER_EXAMPLES_PNG,
    CLUSTER_SIZES_PNG,
    CLUSTER_STATS,
    DISTANCES,
    LABELS,
    METRICS_LOG,
    PRETRAIN,
    REPORT_HTML,
    REPORT_MD,
    TRAIN,
    TRAINING_CURVES_PNG,
    cluster_folder,
)
from clusterfit.config import Config
from clusterfit.data import build_source
from clusterfit.storage import NotFound, Store

EXAMPLE_CLUSTERS = 12
EXAMPLES_PER_CLUSTER = 10


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cluster_sizes_png(stats: dict[str, Any]) -> bytes:
    plt = _pyplot()
    sizes = np.array(stats["sizes"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(sizes, bins=min(50, max(10, len(sizes) // 4)), color="#4477aa")
    ax.set_xlabel("images per cluster")
    ax.set_ylabel("clusters")
    ax.set_title(
        f"K={stats['num_clusters']}: sizes {stats['smallest']}..{stats['largest']}, {stats['empty_clusters']} empty"
    )
    data = _png(fig)
    plt.close(fig)
    return data


def cluster_examples_png(cfg: Config, labels: np.ndarray, distances: np.ndarray) -> bytes:
    """Rows: the largest clusters; columns: their images nearest to the centroid."""
    plt = _pyplot()
    source = build_source(cfg, "TRAIN")
    sizes = np.bincount(labels[labels >= 0], minlength=cfg.CLUSTERFIT.NUM_CLUSTERS)
    clusters = np.argsort(-sizes)[:EXAMPLE_CLUSTERS]
    fig, axes = plt.subplots(
        len(clusters), EXAMPLES_PER_CLUSTER, figsize=(EXAMPLES_PER_CLUSTER * 0.8, len(clusters) * 0.85)
    )
    axes = np.atleast_2d(axes)
    for row, cluster in enumerate(clusters):
        members = np.flatnonzero(labels == cluster)
        members = members[np.argsort(distances[members])][:EXAMPLES_PER_CLUSTER]
        for col in range(EXAMPLES_PER_CLUSTER):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(members):
                ax.imshow(source.load(int(members[col])))
        axes[row, 0].set_title(f"#{cluster} ({sizes[cluster]})", fontsize=6, loc="left")
    data = _png(fig)
    plt.close(fig)
    return data


def curves_png(histories: dict[str, list[dict[str, Any]]]) -> bytes:
    plt = _pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        loss_ax.plot(epochs, [r["loss"] for r in rows], marker=".", label=name)
        acc_ax.plot(epochs, [r["top1"] for r in rows], marker=".", label=name)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="top-1 on its own targets (%)", title="training accuracy")
    loss_ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data


def histories(store: Store) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, folder in (("RotNet pretrain", PRETRAIN), ("ClusterFit train", TRAIN)):
        try:
            out[name] = [
                json.loads(line) for line in store.get_bytes(f"{folder}/{METRICS_LOG}").decode().splitlines() if line
            ]
        except NotFound:
            continue
    return out


def table_md(metrics: dict[str, Any]) -> list[str]:
    if metrics.get("protocol") == "vissl_linear":
        lines = ["| model | layer | dim | VISSL linear top-1 (%) |", "| --- | --- | ---: | ---: |"]
        return lines + [
            f"| {r['model']} | {r['layer']} | {r['dim']} | {r['linear_top1']:.2f} |" for r in metrics["rows"]
        ]
    shots = list(metrics["rows"][0].get("low_shot", {})) if metrics["rows"] else []
    head = ["model", "layer", "dim", "kNN top-1 (%)", *(f"kNN {n}-shot top-1 (%)" for n in shots), "linear top-1 (%)"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for r in metrics["rows"]:
        low = [f"{r['low_shot'][n]['top1']:.2f} ± {r['low_shot'][n]['std']:.1f}" for n in shots]
        lines.append(
            "| "
            + " | ".join(
                [r["model"], r["layer"], str(r["dim"]), f"{r['knn_top1']:.2f}", *low, f"{r['linear_top1']:.2f}"]
            )
            + " |"
        )
    return lines


def verdict_summary(metrics: dict[str, Any]) -> str:
    """One line: how many metrics went which way."""
    comparison = metrics["comparison"]
    if not comparison:
        return "No starting model or ClusterFit row to compare."
    count = {v: sum(c["verdict"] == v for c in comparison) for v in ("better", "worse", "within noise")}
    return (
        f"Summary: ClusterFit vs. {comparison[0]['reference']} is better on {count['better']} of {len(comparison)} "
        "metrics, "
        f"worse on {count['worse']}, within noise on {count['within noise']}."
    )


def metric_name(metric: str, shots: int | None, protocol: str) -> str:
    if shots:
        return f"kNN {shots}-shot top-1"
    if metric == "linear_top1":
        return "VISSL linear top-1" if protocol == "vissl_linear" else "linear top-1"
    return "kNN top-1"


def evidence(c: dict[str, Any]) -> str:
    """The paired test behind a verdict, in words."""
    if c["test"] == "McNemar mid-p":
        return f"McNemar mid-p {c['p_value']:.2g}: {c['b']} images only ClusterFit gets right, {c['c']} only the other"
    low, high = c["interval_95"]
    return f"paired bootstrap p {c['p_value']:.2g}, 95% interval {low:+.2f}..{high:+.2f}"


def verdict_lines(metrics: dict[str, Any]) -> list[str]:
    protocol = metrics.get("protocol", "quick")
    return [
        f"- {c['layer']} {metric_name(c['metric'], c.get('shots'), protocol)}: ClusterFit {c['clusterfit']:.2f}% "
        f"vs. {c['reference']} {c['reference_value']:.2f}% ({c['delta']:+.2f} points; {evidence(c)}): "
        f"**{c['verdict']}**"
        for c in metrics["comparison"]
    ]


def seed_lines(metrics: dict[str, Any]) -> list[str]:
    """The spread over training seeds (EVALUATE.OTHER_SEEDS), when there is one."""
    spread = metrics.get("seed_spread")
    if not spread:
        return []
    protocol = metrics.get("protocol", "quick")
    lines = ["## Spread over training seeds", ""]
    for s in spread:
        name = metric_name(s["metric"], s["shots"], protocol)
        lines.append(
            f"- {s['layer']} {name}: ClusterFit {s['clusterfit_mean']:.2f} ± {s['clusterfit_std']:.2f}%, "
            f"difference {s['delta_mean']:+.2f} ± {s['delta_std']:.2f} points over {s['seeds']} seeds"
        )
    return [*lines, ""]


def markdown(cfg: Config, metrics: dict[str, Any], images: list[tuple[str, str]]) -> str:
    parts = [
        f"# ClusterFit report: {cfg.EXPERIMENT.NAME}",
        "",
        f"Starting weights: `{metrics['start_weights']}`; K={cfg.CLUSTERFIT.NUM_CLUSTERS} clusters of "
        f"`{cfg.CLUSTERFIT.FEATURES.LAYER_NAME}`; "
        f"{metrics['n_train']} training and {metrics['n_test']} test images.",
        "",
        "## Did ClusterFit beat the features it started from?",
        "",
        verdict_summary(metrics),
        "",
        *verdict_lines(metrics),
        "",
        f"A difference counts when a paired test on the same {metrics['n_test']} test images finds it (p < "
        f"{metrics.get('significance', 0.05)}): McNemar's mid-p on the images only one model gets right, and for "
        "low-shot kNN a paired bootstrap over the images and the random labelled subsets; otherwise it is within "
        "noise.",
        "",
        *(
            [
                "Low-shot columns: mean ± standard deviation over the random labelled subsets of n TRAIN images per "
                "class."
            ]
            if any(r.get("low_shot") for r in metrics["rows"])
            else []
        ),
        "",
        *seed_lines(metrics),
        "## Evaluation" + (" (VISSL linear benchmark)" if metrics.get("protocol") == "vissl_linear" else ""),
        "",
        *table_md(metrics),
        "",
    ]
    source = f" `{metrics['cluster_labels']}`" if "cluster_labels" in metrics else ""
    for split, values in metrics["clusters"].items():
        parts.append(
            f"- Training labels{source} vs. ground truth ({split}): NMI {values['nmi']:.3f}, ARI {values['ari']:.3f}"
        )
    parts.append("")
    for title, name in images:
        parts += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(parts)


STYLE = (
    "body{font-family:sans-serif;max-width:960px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd}"
    "th{text-align:left}img{max-width:100%}"
)


def to_html(text: str, title: str) -> str:
    """The report's Markdown as a standalone HTML page (Python-Markdown with its tables extension).

    Raw HTML in the text is shown as text, not interpreted: names and URIs in the report come from the
    config, and a `<` in them must neither vanish nor become markup."""
    import markdown as md

    converter = md.Markdown(extensions=["tables"], output_format="html")
    converter.preprocessors.deregister("html_block")
    converter.inlinePatterns.deregister("html")
    body = converter.convert(text)
    return (
        f"<!doctype html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n<title>{html.escape(title)}</title>\n"
        f"<style>{STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The verdict in a few lines: the summary, then one line per compared metric (what `clusterfit run` prints)."""
    return [verdict_summary(metrics), *verdict_lines(metrics)]


def write(cfg: Config, store: Store, ledger: artifacts.Ledger, metrics: dict[str, Any]) -> None:
    images: list[tuple[str, str]] = []
    if not cfg.DATA.TRAIN.LABEL_PATHS:  # else training used other labels than the experiment's clusters
        folder = cluster_folder(cfg)
        manifest = artifacts.read_manifest(store, folder)
        stats = artifacts.load_json(store, folder, CLUSTER_STATS, manifest)
        labels = artifacts.load_array(store, folder, LABELS, manifest)
        distances = artifacts.load_array(store, folder, DISTANCES, manifest)
        images += [
            ("Cluster sizes", CLUSTER_SIZES_PNG),
            ("Example images per cluster (nearest to the centroid first)", CLUSTER_EXAMPLES_PNG),
        ]
        ledger.put_bytes(CLUSTER_SIZES_PNG, cluster_sizes_png(stats))
        ledger.put_bytes(CLUSTER_EXAMPLES_PNG, cluster_examples_png(cfg, labels, distances))
    curves = histories(store)
    if curves:
        ledger.put_bytes(TRAINING_CURVES_PNG, curves_png(curves))
        images.append(("Training curves", TRAINING_CURVES_PNG))
    text = markdown(cfg, metrics, images)
    ledger.put_bytes(REPORT_MD, text.encode())
    ledger.put_bytes(REPORT_HTML, to_html(text, f"ClusterFit report: {cfg.EXPERIMENT.NAME}").encode())
