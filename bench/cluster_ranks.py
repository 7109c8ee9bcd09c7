"""The cluster step run by several ranks at once, as the pods of a Kubernetes job run it.

    python bench/cluster_ranks.py                                    # 1 and 2 ranks, 3 repeats (~4 min on 2 cores)
    python bench/cluster_ranks.py --shape 40000x64x200 --repeats 1   # a smoke run (under a minute)
    python bench/cluster_ranks.py --ranks 1 2 4 --data-limit 50000

The features are published as extract publishes them (bench/cluster.py's fixture: parts of 4096
rows, manifest and `model` entry, under a file:// root in a temp dir). For each world size W every
rank starts at once as its own process (`common.run_child`, peak RSS polled per rank) with the
variables the PyTorchJob operator sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK=0:
one process per pod) and OMP_NUM_THREADS = cores // W, at least 1 (the BLAS's thread count too),
so the ranks together run as many threads as the machine has cores. Inside each rank
`clusterfit.steps.cluster.run` runs unchanged: rank 0 trains the centroids on a sample of
CLUSTERFIT.DATA_LIMIT rows, every rank assigns its share of the parts, rank 0 merges and publishes
the labels. The default shape, N=4M d=128 K=2000 with 5 iterations on 80k rows, makes the
assignment (N rows) dominate the training (5 x 80k rows).

Per rank (the step records no assignment timings, so the child wraps the step's functions):
- wall s: the rank's process, from start to exit (interpreter and imports included);
- train s: `train_centroids` (rank 0: reads every part for its sample, normalises, k-means);
- wait s: `wait_for_keys` (rank > 0: for rank 0's centroids; rank 0: for the others' assignments);
- assign s: `assign_parts` (reads the rank's parts, or rank 0's cache, normalises, searches);
  search s: the faiss search calls inside it;
- merge s: rank 0's `publish` without its waiting (concatenate, order, write labels, manifest).
The total is the wall time from starting the ranks to the last one's exit (rank 0, once the
labels are published); ranks poll the store for each other every 0.5 s. Labels published by every
world size are compared with the smallest world size's; and, since faiss's k-means may train other
centroids with another thread count, with a control run once: the smallest world size at the
larger world size's threads per rank (1 rank x 1 thread on 2 cores).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import cluster as bench_cluster
import common
import numpy as np

SCRIPT = str(Path(__file__).resolve())
TIMEOUT_S = 1800.0
FIGURES = ["train_s", "wait_s", "assign_s", "search_s", "publish_s"]
# The step's functions each rank's child times, by the figure they add to.
PHASES = {"train_centroids": "train_s", "wait_for_keys": "wait_s", "assign_parts": "assign_s", "publish": "publish_s"}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def parse_shape(text: str) -> tuple[int, int, int]:
    n, d, k = (int(v) for v in text.split("x"))
    return n, d, k


def threads_for(world_size: int, cores: int) -> int:
    return max(1, cores // world_size)


# ---- one rank (in a child) -----------------------------------------------------------------------


def rank_config(p: dict[str, Any]) -> Any:
    """bench/cluster.py's step config with the training sample capped at DATA_LIMIT rows."""
    from clusterfit.config.loading import validate

    tree = bench_cluster.step_config(Path(p["root"]), bench_cluster.Shape(**p["shape"])).model_dump(mode="json")
    tree["CLUSTERFIT"] |= {"DATA_LIMIT": p["data_limit"], "RANK_WAIT_TIMEOUT_S": TIMEOUT_S}
    return validate(tree)


def clocked(figures: dict[str, float], key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, adding the seconds each call takes to figures[key]."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            figures[key] += time.perf_counter() - start

    return wrapper


def run_rank(p: dict[str, Any]) -> dict[str, Any]:
    """The cluster step as this process's RANK runs it, with the seconds spent in each of its phases."""
    import faiss

    from clusterfit import kmeans, runtime
    from clusterfit.artifacts.layout import LABELS
    from clusterfit.steps import cluster as cluster_step

    runtime.setup_logging()  # rank-tagged lines in the stderr tail the parent keeps
    figures = dict.fromkeys(FIGURES, 0.0)
    for name, key in PHASES.items():
        setattr(cluster_step, name, clocked(figures, key, getattr(cluster_step, name)))
    make_assigner = kmeans.assigner

    def timed_assigner(*args: Any) -> Any:
        inner = make_assigner(*args)
        inner.assign = clocked(figures, "search_s", inner.assign)  # type: ignore[method-assign]
        return inner

    kmeans.assigner = timed_assigner  # type: ignore[assignment]
    cfg = rank_config(p)
    clock = common.Clock()
    result = cluster_step.run(cfg)
    step = clock.read()
    ranks = runtime.ranks_from_env()
    merge_s = figures["publish_s"] - figures["wait_s"] if ranks.is_main else 0.0  # rank 0 waits only in publish
    return {
        **figures,
        "rank": ranks.rank,
        "merge_s": merge_s,
        "step_s": step["seconds"],
        "step_cpu_s": step["cpu_s"],
        "omp_threads": faiss.omp_get_max_threads(),
        "blas": common.blas_info(),
        "labels": str(Path(p["root"]) / result.folder / LABELS) if ranks.is_main else None,  # type: ignore[union-attr]
    }


CHILDREN: dict[str, common.Method] = {"rank": run_rank}


# ---- every rank of one setting -------------------------------------------------------------------

Setting = tuple[int, int]  # (world size, threads per rank)


def settings_for(world_sizes: list[int], cores: int) -> tuple[list[Setting], list[Setting]]:
    """Each world size at cores // W threads per rank; and the controls, the smallest world size at the
    others' thread counts, so that labels are also compared at the same thread count per rank."""
    main = [(w, threads_for(w, cores)) for w in sorted(set(world_sizes))]
    smallest = min(world_sizes)
    return main, sorted({(smallest, threads) for _, threads in main} - set(main))


def name_of(setting: Setting) -> str:
    world_size, threads = setting
    return f"{world_size} rank{'s' * (world_size > 1)} x {threads} thread{'s' * (threads > 1)}"


def rank_env(rank: int, world_size: int, threads: int) -> dict[str, str]:
    """What the PyTorchJob operator gives one pod, and the thread count for its share of the cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env |= {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"}
    env |= {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}  # required by ranks_from_env; the step needs no port
    return env | dict.fromkeys(THREAD_VARS, str(threads))


def timed_child(params: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    start = time.perf_counter()
    result = common.run_child(SCRIPT, "rank", params, TIMEOUT_S, env)
    return result | {"wall_s": time.perf_counter() - start}


def run_world(params: dict[str, Any], setting: Setting) -> dict[str, Any]:
    """Start every rank at once; their figures, the total wall time and the published labels and centroids."""
    from clusterfit.artifacts.layout import CENTROIDS

    world_size, threads = setting
    start = time.perf_counter()
    with ThreadPoolExecutor(world_size) as pool:
        futures = [pool.submit(timed_child, params, rank_env(r, world_size, threads)) for r in range(world_size)]
        ranks = [future.result() for future in futures]
    total_s = time.perf_counter() - start
    labels = np.load(ranks[0]["labels"])
    centroids = np.load(Path(ranks[0]["labels"]).parent / CENTROIDS)
    shutil.rmtree(Path(params["root"]) / "clusters")  # else the next run finds them published and skips
    return {
        "world_size": world_size,
        "threads": threads,
        "total_s": total_s,
        "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest(),
        "labels": labels,
        "centroids": centroids,
        "ranks": [{k: v for k, v in r.items() if k != "stderr_tail"} for r in ranks],
    }


def bench(args: argparse.Namespace, cores: int, work: Path) -> dict[Setting, list[dict[str, Any]]]:
    """Every world size `repeats` times, their order rotated per repeat; then each control once."""
    n, d, k = args.shape
    shape = bench_cluster.Shape(n, d, k, args.iters, args.repeats)
    print(f"[{shape.name}] publishing the features", file=sys.stderr, flush=True)
    bench_cluster.publish_features(work / "root", shape, bench_cluster.blobs(n, d, k))
    params = {"root": str(work / "root"), "shape": asdict(shape), "data_limit": args.data_limit}
    main, controls = settings_for(args.ranks, cores)
    runs: dict[Setting, list[dict[str, Any]]] = {s: [] for s in main + controls}
    order = [(rep, s) for rep in range(args.repeats) for s in main[rep % len(main) :] + main[: rep % len(main)]]
    for rep, setting in order + [(0, s) for s in controls]:
        run = run_world(params, setting)
        runs[setting].append(run)
        print(
            f"[{shape.name}] rep {rep} {name_of(setting)}: {run['total_s']:.1f}s to published labels",
            file=sys.stderr,
            flush=True,
        )
    return runs


# ---- medians, labels, the table, the scaling line ------------------------------------------------


def summarise(runs: dict[Setting, list[dict[str, Any]]], shape: tuple[int, int, int]) -> dict[Setting, dict[str, Any]]:
    """Medians over repeats per setting and rank. The search's GFLOP/s: 2*N*K*D over the slowest
    rank's search seconds (the ranks search at once)."""
    search_gflop = 2.0 * shape[0] * shape[1] * shape[2] / 1e9
    out: dict[Setting, dict[str, Any]] = {}
    for (world_size, threads), reps in runs.items():
        keys = ["wall_s", "step_s", "merge_s", "peak_rss_mb", *FIGURES]
        ranks = [
            {key: common.median([rep["ranks"][r][key] for rep in reps]) for key in keys} for r in range(world_size)
        ]
        out[world_size, threads] = {
            "name": name_of((world_size, threads)),
            "world_size": world_size,
            "threads": threads,
            "runs_count": len(reps),
            "omp_threads_seen": sorted({r["omp_threads"] for rep in reps for r in rep["ranks"]}),
            "total_s": common.median([rep["total_s"] for rep in reps]),
            "assign_s": max(r["assign_s"] for r in ranks),  # the slowest rank's: the others wait for it
            "search_s": max(r["search_s"] for r in ranks),
            "search_gflops": search_gflop / max(r["search_s"] for r in ranks),
            "ranks": ranks,
        }
    return out


def compare_labels(runs: dict[Setting, list[dict[str, Any]]], base: Setting) -> dict[Setting, dict[str, Any]]:
    """Every run's labels against the base's (smallest world size, its own threads) and against the
    smallest world size's at the same thread count per rank (a control); centroids against the base's."""
    first = {s: reps[0] for s, reps in runs.items()}
    out = {}
    for (world_size, threads), reps in runs.items():
        same_threads = first.get((base[0], threads))
        out[world_size, threads] = {
            "differing_rows": [int((rep["labels"] != first[base]["labels"]).sum()) for rep in reps],
            "differing_rows_same_threads": [int((rep["labels"] != same_threads["labels"]).sum()) for rep in reps]
            if same_threads
            else None,
            "centroids_max_abs_diff": float(np.abs(reps[0]["centroids"] - first[base]["centroids"]).max()),
            "sha256": sorted({rep["labels_sha256"] for rep in reps}),
        }
    return out


def labels_line(labels: dict[Setting, dict[str, Any]], base: Setting, num_rows: int) -> str:
    """Whether the labels of more ranks equal the base's, and (when they do not) at the same threads."""
    parts = []
    for setting, c in labels.items():
        if setting[0] == base[0]:
            continue
        same = c["differing_rows_same_threads"]
        verdict = "equal" if not any(c["differing_rows"]) else f"{max(c['differing_rows'])} of {num_rows} rows differ"
        text = (
            f"{name_of(setting)} vs {name_of(base)}: {verdict} (centroids max |diff| {c['centroids_max_abs_diff']:.2g})"
        )
        if any(c["differing_rows"]) and same is not None:
            text += f"; vs {name_of((base[0], setting[1]))}: " + ("equal" if not any(same) else "DIFFER")
            if not any(same):
                text += " (the thread count changes faiss's trained centroids, splitting by rank changes nothing)"
        parts.append(text)
    return "labels: " + ("; ".join(parts) or "-")


COLUMNS = ["world size", "rank", "threads", "wall s", "train s", "wait s", "assign s", "search s", "merge s", "RSS MB"]


def rows_of(summary: dict[Setting, dict[str, Any]], controls: list[Setting]) -> list[list[Any]]:
    rows = []
    for setting, s in summary.items():
        world = f"{s['world_size']} (control)" if setting in controls else s["world_size"]
        for rank, r in enumerate(s["ranks"]):
            figures = [r["wall_s"], r["train_s"], r["wait_s"], r["assign_s"], r["search_s"], r["merge_s"]]
            rows.append([world, rank, s["threads"], *figures, r["peak_rss_mb"]])
        rows.append([world, "total", "", s["total_s"], "", "", s["assign_s"], s["search_s"], "", ""])
    return rows


def scaling(
    summary: dict[Setting, dict[str, Any]], main: list[Setting], controls: list[Setting], cores: int
) -> list[str]:
    """Each world size against the smallest: the assignment's speed-up and what holds it back."""
    base = summary[main[0]]
    rates = ", ".join(f"{summary[s]['name']} {summary[s]['search_gflops']:.1f}" for s in main + controls)
    lines = []
    for setting in main[1:]:
        s = summary[setting]
        r0, others = s["ranks"][0], s["ranks"][1:]
        serial_s, wait_s = r0["train_s"] + r0["merge_s"], max(r["wait_s"] for r in others)
        reads_s = max(r["assign_s"] - r["search_s"] for r in others)
        lines.append(
            f"scaling {base['name']} -> {s['name']}: assignment {base['assign_s']:.1f}s -> {s['assign_s']:.1f}s "
            f"(slowest rank) = {base['assign_s'] / s['assign_s']:.2f}x, end to end {base['total_s']:.1f}s -> "
            f"{s['total_s']:.1f}s = {base['total_s'] / s['total_s']:.2f}x. Limits: the ranks share the same {cores} "
            f"cores, so there is no more compute (search GFLOP/s: {rates}); rank 0 trains the centroids alone, "
            f"reading every part for its sample ({r0['train_s']:.1f}s; the others wait {wait_s:.1f}s), and merges "
            f"alone ({r0['merge_s']:.1f}s): {serial_s:.1f}s serial = {100 * serial_s / s['total_s']:.0f}% of the "
            f"total; the other ranks read and normalise their parts from storage again inside their assignment "
            f"({reads_s:.1f}s; rank 0 reuses the parts it cached while sampling)."
        )
    return lines


def report(
    runs: dict[Setting, list[dict[str, Any]]], args: argparse.Namespace, info: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The printed text, and the figures for the JSON."""
    n, d, k = args.shape
    main, controls = settings_for(args.ranks, info["cores"])
    summary, labels = summarise(runs, args.shape), compare_labels(runs, main[0])
    totals = ", ".join(f"{s['name']} {s['total_s']:.1f}s" for s in summary.values())
    threads = ", ".join(f"{s['name']} (faiss sees {s['omp_threads_seen']})" for s in summary.values())
    lines = [
        f"cluster step by ranks on {common.hardware_line(info)}",
        f"N={n} d={d} K={k}, {args.iters} iterations on DATA_LIMIT={args.data_limit} rows; OMP_NUM_THREADS (and "
        f"{', '.join(THREAD_VARS[1:])}) per rank = cores // world size: {threads}",
        "",
        common.table(COLUMNS, rows_of(summary, controls)),
        "",
        f"medians of {args.repeats} repeats (controls: 1 run). summary: to published labels {totals}",
        labels_line(labels, main[0], n),
        *scaling(summary, main, controls, info["cores"]),
    ]
    figures = {
        "settings": {s["name"]: s | {"labels": labels[key]} for key, s in summary.items()},
        "controls": [name_of(s) for s in controls],
        "labels_equal": not any(max(c["differing_rows"]) for c in labels.values()),
        "scaling": lines[-len(main) + 1 :] if len(main) > 1 else [],
    }
    return "\n".join(lines), figures


def main(argv: list[str]) -> int:
    if common.child_main(CHILDREN, argv):
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=parse_shape, default=(4_000_000, 128, 2000), help="NxDxK")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--iters", type=int, default=5, help="k-means iterations (CLUSTERFIT.N_ITER)")
    parser.add_argument("--data-limit", type=int, default=80_000, help="CLUSTERFIT.DATA_LIMIT: training rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tmp", default=None, help="folder for the temporary data (default: the system's)")
    args = parser.parse_args(argv)
    info = common.machine_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.tmp, prefix="bench-cluster-ranks-") as tmp:
        runs = bench(args, info["cores"], Path(tmp))
    text, figures = report(runs, args, info)
    print(text)
    payload = {
        "command": [sys.executable, *sys.argv],
        "machine": info,
        "cores": info["cores"],
        "shape": dict(zip(("n", "d", "k"), args.shape, strict=True)),
        "arguments": vars(args),
        "thread_setting": f"{', '.join(THREAD_VARS)} = cores // world size (at least 1), per rank",
        **figures,
        "runs": {name_of(s): [strip(rep) for rep in reps] for s, reps in runs.items()},
        "wall_s": time.perf_counter() - started,
        "table": text,
    }
    print(f"\nwrote {common.write_json('cluster_ranks', payload)}", file=sys.stderr)
    return 0


def strip(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k not in ("labels", "centroids")}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
