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
    SUPERVISED,
    SWEEP_PNG,
    TRAINING_CURVES_PNG,
    cluster_folder,
    train_folder,
)
from clusterfit.config import Config
from clusterfit.data import build_source
from clusterfit.probes import metric_values
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


def histories(cfg: Config, store: Store) -> dict[str, list[dict[str, Any]]]:
    """Per-epoch metrics of every network this experiment trained, by name."""
    out = {}
    named = [("RotNet pretrain", PRETRAIN)]
    for k in cfg.CLUSTERFIT.cluster_counts:
        named.append(
            (
                f"ClusterFit K={k}" if cfg.CLUSTERFIT.is_sweep else "ClusterFit train",
                train_folder(cfg.with_num_clusters(k)),
            )
        )
    if "supervised" in cfg.EVALUATE.BASELINES:
        named.append(("supervised (true labels)", SUPERVISED))
    for name, folder in named:
        try:
            out[name] = [
                json.loads(line) for line in store.get_bytes(f"{folder}/{METRICS_LOG}").decode().splitlines() if line
            ]
        except NotFound:
            continue
    return out


def sweep_layer(metrics: dict[str, Any]) -> str:
    """The layer the K sweep is shown on: the last one evaluated (res5avg by default)."""
    return str(metrics["rows"][-1]["layer"])


def sweep_rows(metrics: dict[str, Any]) -> list[tuple[str, int | None, dict[str, tuple[int | None, float]]]]:
    """(name, K or None, metric values on sweep_layer) for start, each K, and supervised, in that order."""
    layer = sweep_layer(metrics)
    out: list[tuple[str, int | None, dict[str, tuple[int | None, float]]]] = []
    for row in metrics["rows"]:
        if row["layer"] != layer:
            continue
        if row["model"].startswith("clusterfit-k"):
            out.append((network_name(row["model"]), int(row["model"].removeprefix("clusterfit-k")), metric_values(row)))
        elif row["model"] in ("start", "supervised", "random"):
            out.append((row["model"], None, metric_values(row)))
    return out


def sweep_md(metrics: dict[str, Any]) -> list[str]:
    """The K sweep as a table: top-1 per metric on sweep_layer, with the clusters' NMI/ARI on TRAIN."""
    rows = sweep_rows(metrics)
    protocol = metrics.get("protocol", "quick")
    names = list(rows[0][2])
    agreement = {a["k"]: a["TRAIN"] for a in metrics["sweep"]}
    head = ["", "NMI", "ARI", *(metric_name(m, rows[0][2][m][0], protocol) + " (%)" for m in names)]
    lines = [
        f"## K sweep ({sweep_layer(metrics)})",
        "",
        "| " + " | ".join(head) + " |",
        "| --- |" + " ---: |" * (len(head) - 1),
    ]
    for name, k, values in rows:
        nmi = f"{agreement[k]['nmi']:.3f}" if k in agreement else ""
        ari = f"{agreement[k]['ari']:.3f}" if k in agreement else ""
        lines.append("| " + " | ".join([name, nmi, ari, *(f"{values[m][1]:.2f}" for m in names)]) + " |")
    return [*lines, ""]


def sweep_png(metrics: dict[str, Any]) -> bytes:
    """Top-1 against K per metric (log K), the start and the supervised network as dashed lines."""
    plt = _pyplot()
    rows = sweep_rows(metrics)
    protocol = metrics.get("protocol", "quick")
    swept = [(k, values) for _, k, values in rows if k is not None]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, metric in enumerate(swept[0][1]):
        color = f"C{i}"
        label = metric_name(metric, swept[0][1][metric][0], protocol)
        ax.plot([k for k, _ in swept], [v[metric][1] for _, v in swept], marker="o", color=color, label=label)
        for name, k, values in rows:
            if k is None and name in ("start", "supervised"):
                ax.axhline(values[metric][1], color=color, linestyle="--" if name == "start" else ":", linewidth=1)
    ax.set_xscale("log")
    ax.set(
        xlabel="K (clusters)",
        ylabel="top-1 (%)",
        title=f"K sweep, {sweep_layer(metrics)}: dashed start, dotted supervised",
    )
    ax.legend(fontsize=7)
    data = _png(fig)
    plt.close(fig)
    return data


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
    p = f"< {1 / c['resamples']:.2g}" if c["p_value"] == 0 and "resamples" in c else f"{c['p_value']:.2g}"
    return f"paired bootstrap p {p}, 95% interval {low:+.2f}..{high:+.2f}"


def network_name(model: str) -> str:
    """`clusterfit` -> ClusterFit, `clusterfit-k30` -> ClusterFit K=30."""
    return "ClusterFit" if model == "clusterfit" else model.replace("clusterfit-k", "ClusterFit K=")


def gap(c: dict[str, Any]) -> str:
    """How much of the reference-to-supervised gap ClusterFit closed, when there is a supervised row."""
    if c.get("gap_closed") is None:
        return ""
    return gap_phrase(c["gap_closed"], f"{c['supervised']:.2f}%")


def gap_phrase(closed: float, supervised: str) -> str:
    """The share of the gap in words; past supervision (or below the start) a percentage would read as nonsense."""
    if closed > 1:
        return f"; above supervised {supervised}"
    if closed < 0:
        return f"; supervised {supervised}"
    return f"; closes {100 * closed:.0f}% of the gap to supervised {supervised}"


def verdict_lines(metrics: dict[str, Any]) -> list[str]:
    protocol = metrics.get("protocol", "quick")
    return [
        f"- {c['layer']} {metric_name(c['metric'], c.get('shots'), protocol)}: "
        f"{network_name(c.get('model', 'clusterfit'))} {c['clusterfit']:.2f}% "
        f"vs. {c['reference']} {c['reference_value']:.2f}% ({c['delta']:+.2f} points; {evidence(c)}{gap(c)}): "
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
            f"- {s['layer']} {name}: {network_name(s.get('model', 'clusterfit'))} "
            f"{s['clusterfit_mean']:.2f} ± {s['clusterfit_std']:.2f}%, "
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
    if metrics.get("sweep"):
        parts += sweep_md(metrics)
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


def p_text(p: float) -> str:
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def seeds_verdict_lines(summary: dict[str, Any]) -> list[str]:
    """One line per compared metric over the seeds: means ± std, each seed's difference, the combined test."""
    protocol = summary.get("protocol", "quick")
    lines = []
    for c in summary["comparison"]:
        upper = ""
        if c.get("gap_closed") is not None:
            upper = gap_phrase(c["gap_closed"], f"{c['supervised_mean']:.2f} ± {c['supervised_std']:.2f}%")
        per_seed = ", ".join(f"{d:+.2f}" for d in c["deltas"])
        lines.append(
            f"- {c['layer']} {metric_name(c['metric'], c.get('shots'), protocol)}: {network_name(c['model'])} "
            f"{c['clusterfit_mean']:.2f} ± {c['clusterfit_std']:.2f}% vs. {c['reference']} "
            f"{c['reference_mean']:.2f} ± {c['reference_std']:.2f}% ({c['delta_mean']:+.2f} ± {c['delta_std']:.2f} "
            f"points; per seed {per_seed}; combined p {p_text(c['p_value'])}{upper}): **{c['verdict']}**"
        )
    return lines


def seeds_summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `clusterfit run` prints after a run over several seeds."""
    return [verdict_summary(summary) + f" (over {len(summary['seeds'])} seeds)", *seeds_verdict_lines(summary)]


def seeds_table_md(summary: dict[str, Any]) -> list[str]:
    """Every row's metrics as mean ± std over the seeds."""
    protocol = summary.get("protocol", "quick")
    metrics = list(summary["rows"][0]["std"])
    shots = {m: s for m, (s, _) in metric_values(summary["rows"][0]).items()}
    head = ["model", "layer", "dim", *(metric_name(m, shots[m], protocol) + " (%)" for m in metrics)]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]
    for row in summary["rows"]:
        values = metric_values(row)
        cells = [f"{values[m][1]:.2f} ± {row['std'][m]:.2f}" for m in metrics]
        lines.append("| " + " | ".join([row["model"], row["layer"], str(row["dim"]), *cells]) + " |")
    return lines


def seeds_markdown(cfg: Config, summary: dict[str, Any], images: list[tuple[str, str]]) -> str:
    seeds = ", ".join(map(str, summary["seeds"]))
    parts = [
        f"# ClusterFit report: {cfg.EXPERIMENT.NAME}, {len(summary['seeds'])} seeds",
        "",
        f"Seeds {seeds}, each a whole run (pretrain, k-means, training) under `seed-<seed>/`; K="
        f"{', '.join(map(str, cfg.CLUSTERFIT.cluster_counts))} clusters of `{cfg.CLUSTERFIT.FEATURES.LAYER_NAME}`; "
        f"{summary['n_train']} training and {summary['n_test']} test images. Every figure is the mean ± the "
        "standard deviation over the seeds.",
        "",
        "## Did ClusterFit beat the features it started from?",
        "",
        verdict_summary(summary) + f" (over {len(summary['seeds'])} seeds)",
        "",
        *seeds_verdict_lines(summary),
        "",
        "Each seed's paired test on the same test images (McNemar mid-p; a paired bootstrap for low-shot kNN) gives a "
        "p-value and a sign; Stouffer's method combines them. A difference counts (better or worse) when the "
        f"combined p < {summary['significance']} and every seed's difference has the same sign; otherwise it is "
        "within noise. The share of the gap closed is (ClusterFit - start) / (supervised - start) of the means.",
        "",
        "## Evaluation (mean ± std over seeds)",
        "",
        *seeds_table_md(summary),
        "",
    ]
    for split, values in summary["clusters"].items():
        parts.append(
            f"- Training labels vs. ground truth ({split}): NMI {values['nmi']:.3f} ± {values['nmi_std']:.3f}, "
            f"ARI {values['ari']:.3f} ± {values['ari_std']:.3f}"
        )
    parts.append("")
    if summary.get("sweep"):
        parts += sweep_md(summary)
    for title, name in images:
        parts += [f"## {title}", "", f"![{title}]({name})", ""]
    return "\n".join(parts)


def write_seeds(cfg: Config, ledger: artifacts.Ledger, summary: dict[str, Any]) -> None:
    """The report over EXPERIMENT.SEEDS, beside its metrics.json."""
    images: list[tuple[str, str]] = []
    if summary.get("sweep"):
        ledger.put_bytes(SWEEP_PNG, sweep_png(summary))
        images.append(("Top-1 against K (means over seeds)", SWEEP_PNG))
    text = seeds_markdown(cfg, summary, images)
    ledger.put_bytes(REPORT_MD, text.encode())
    title = f"ClusterFit report: {cfg.EXPERIMENT.NAME}, {len(summary['seeds'])} seeds"
    ledger.put_bytes(REPORT_HTML, to_html(text, title).encode())


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
    if metrics.get("sweep"):
        ledger.put_bytes(SWEEP_PNG, sweep_png(metrics))
        images.append(("Top-1 against K", SWEEP_PNG))
    curves = histories(cfg, store)
    if curves:
        ledger.put_bytes(TRAINING_CURVES_PNG, curves_png(curves))
        images.append(("Training curves", TRAINING_CURVES_PNG))
    text = markdown(cfg, metrics, images)
    ledger.put_bytes(REPORT_MD, text.encode())
    ledger.put_bytes(REPORT_HTML, to_html(text, f"ClusterFit report: {cfg.EXPERIMENT.NAME}").encode())
