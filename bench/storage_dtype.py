"""What EXTRACT.STORAGE_DTYPE=float16 / bfloat16 changes: bytes, the k-means objective, the labels.

    python bench/storage_dtype.py                          # quickstart + synthetic d=2048 (~12 min, 2 cores)
    python bench/storage_dtype.py --pretrain-epochs 2      # a shorter quickstart pretraining
    python bench/storage_dtype.py --skip-quickstart --synthetic 16000x2048x200x20

Quickstart: `clusterfit run config=quickstart` steps pretrain, extract and cluster in a temp dir
(float32), then extract + cluster again with each half-precision dtype on a copy of that root (the
same pretrained network: the storage is the only difference), and the cluster step once more with
another seed on the float32 features. Synthetic: N points at d=2048 around C centres, non-negative
as pooled ReLU features are, over-clustered with K > C as ClusterFit over-clusters, published the
way extract publishes each dtype; the cluster step runs on each in its own process.

Figures per dtype: bytes of the feature parts; the k-means objective of its labels and centroids
evaluated on the float32 features (normalised as the step normalises them), relative to float32's;
the share of labels equal to float32's and the adjusted Rand index. The float32 run with another
seed gives the scale of change that k-means itself has.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

DTYPES = ["float32", "float16", "bfloat16"]
OTHER_SEED = 1


def objective(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray, rows: int = 8192) -> float:
    """Mean squared distance of each row to its centroid (rows without a label left out)."""
    total, count = 0.0, 0
    for start in range(0, len(x), rows):
        lab = labels[start : start + rows]
        keep = lab >= 0
        diff = x[start : start + rows][keep] - centroids[lab[keep]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        count += int(keep.sum())
    return total / max(count, 1)


def features_float32(root: Path) -> np.ndarray:
    """The float32 features of features/train, in dataset order, L2-normalised as the step does."""
    from clusterfit.artifacts.features import FeatureParts
    from clusterfit.artifacts.layout import features_folder
    from clusterfit.kmeans import l2_normalize
    from clusterfit.storage import open_store

    parts = FeatureParts.open(open_store(root.as_uri()), features_folder("TRAIN"), "res5")
    out = np.empty((parts.num_images, parts.dim), np.float32)
    for index, feats in parts.iter_parts():
        out[index] = feats
    return l2_normalize(out, inplace=True)


def part_bytes(root: Path) -> int:
    manifest = json.loads((root / "features/train/_SUCCESS.json").read_text())
    return sum(
        e["size"] for name, e in manifest["files"].items() if "/part-" in name and not name.endswith("-index.npy")
    )


def clusters(root: Path) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels, centroids, the step's wall seconds) of the one clusters/ folder under root."""
    (folder,) = [p.parent for p in (root / "clusters").glob("*/_SUCCESS.json")]
    wall = json.loads((folder / "_SUCCESS.json").read_text())["timings"]["wall_s"]
    return np.load(folder / "labels.npy"), np.load(folder / "centroids.npy"), float(wall)


def compare(x32: np.ndarray, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's objective on the float32 features and its agreement with the float32 labels."""
    from sklearn.metrics import adjusted_rand_score

    base = runs["float32"]
    base_objective = objective(x32, base["labels"], base["centroids"])
    rows = []
    for name, run in runs.items():
        value = objective(x32, run["labels"], run["centroids"])
        rows.append(
            {
                "run": name,
                "part_mb": run["bytes"] / 2**20,
                "bytes_vs_float32": run["bytes"] / base["bytes"],
                "cluster_s": run["cluster_s"],
                "objective_f32": value,
                "objective_change": value / base_objective - 1,
                "labels_equal": float((run["labels"] == base["labels"]).mean()),
                "ari": float(adjusted_rand_score(base["labels"], run["labels"])),
            }
        )
    return rows


# ---- quickstart -----------------------------------------------------------------------------------


def cli(root: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "clusterfit", "run", "config=quickstart", f"config.EXPERIMENT.ROOT={root}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")


def quickstart(tmp: Path, pretrain_epochs: int | None) -> dict[str, Any]:
    epochs = [f"config.PRETRAIN.OPTIMIZER.NUM_EPOCHS={pretrain_epochs}"] if pretrain_epochs else []
    base = tmp / "quickstart-float32"
    started = time.perf_counter()
    cli(base, "config.PIPELINE.STEPS=[pretrain,extract,cluster]", *epochs)
    print(
        f"quickstart: pretrain + extract + cluster (float32) in {time.perf_counter() - started:.0f}s", file=sys.stderr
    )
    weights = f"config.MODEL.WEIGHTS_INIT.PARAMS_FILE={(base / 'pretrain/final.pt').as_uri()}"
    runs: dict[str, dict[str, Any]] = {}
    for name, steps, extra in [
        # Without pretrain in the steps, extract starts from the network it is given: base's.
        *[(dtype, "[extract,cluster]", [f"config.EXTRACT.STORAGE_DTYPE={dtype}", weights]) for dtype in DTYPES[1:]],
        (f"float32, seed {OTHER_SEED}", "[cluster]", [f"config.EXPERIMENT.SEED={OTHER_SEED}", weights]),
    ]:
        root = tmp / f"quickstart-{len(runs)}"
        shutil.copytree(base, root, ignore=shutil.ignore_patterns("clusters"))
        cli(root, f"config.PIPELINE.STEPS={steps}", *epochs, *extra)
        runs[name] = load_run(root)
    runs = {"float32": load_run(base), **runs}
    x32 = features_float32(base)
    return {"n": len(x32), "d": x32.shape[1], "k": len(runs["float32"]["centroids"]), "rows": compare(x32, runs)}


def load_run(root: Path) -> dict[str, Any]:
    labels, centroids, wall = clusters(root)
    return {"labels": labels, "centroids": centroids, "cluster_s": wall, "bytes": part_bytes(root)}


# ---- synthetic ------------------------------------------------------------------------------------


def synthetic_features(n: int, d: int, centres: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centres, d), dtype=np.float32)
    x = means[rng.integers(0, centres, n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return np.maximum(x, 0, out=x)


def run_cluster(p: dict[str, Any]) -> dict[str, Any]:
    """In a child: the cluster step on the features under p["root"], with p["seed"]."""
    import cluster as cluster_bench

    from clusterfit.steps import cluster

    shape = cluster_bench.Shape(**p["shape"])
    cfg = cluster_bench.step_config(Path(p["root"]), shape)
    cfg = cfg.model_copy(update={"EXPERIMENT": cfg.EXPERIMENT.model_copy(update={"SEED": p["seed"]})})
    clock = common.Clock()
    cluster.run(cfg)
    return clock.read()


def synthetic(tmp: Path, text: str, centres: int) -> dict[str, Any]:
    import cluster as cluster_bench

    n, d, k, iters = text.split("x")
    shape = cluster_bench.Shape.parse(f"{n}x{d}x{k}:{iters}")
    x = synthetic_features(shape.n, shape.d, centres)
    runs: dict[str, dict[str, Any]] = {}
    plan = [(dtype, dtype, cluster_bench.SEED) for dtype in DTYPES]
    plan.append((f"float32, seed {OTHER_SEED}", "float32", OTHER_SEED))
    for name, dtype, seed in plan:
        root = tmp / f"synthetic-{dtype}"
        if not root.exists():
            cluster_bench.publish_features(root, shape, x, dtype)
        shutil.rmtree(root / "clusters", ignore_errors=True)
        child = common.run_child(__file__, "cluster", {"root": str(root), "shape": vars(shape), "seed": seed})
        runs[name] = load_run(root) | {"peak_rss_mb": child["peak_rss_mb"]}
        print(f"synthetic {name}: cluster step {child['seconds']:.1f}s", file=sys.stderr)
    x32 = cluster_bench.normalised(x)
    return {
        "n": shape.n,
        "d": shape.d,
        "k": shape.k,
        "centres": centres,
        "iters": shape.iters,
        "rows": compare(x32, runs),
    }


def report(results: dict[str, dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [f"feature storage dtype on {common.hardware_line(info)}"]
    for name, result in results.items():
        shape = f"N={result['n']} d={result['d']} K={result['k']}"
        if "centres" in result:
            shape += f" ({result['centres']} centres, {result['iters']} iterations)"
        rows = [
            [
                r["run"],
                r["part_mb"],
                f"{r['bytes_vs_float32']:.3f}x",
                r["cluster_s"],
                f"{100 * r['objective_change']:+.3f}%",
                f"{100 * r['labels_equal']:.1f}%",
                r["ari"],
            ]
            for r in result["rows"]
        ]
        columns = ["run", "parts MB", "bytes", "cluster s", "objective vs float32", "labels = float32", "ARI"]
        lines += ["", f"{name}: {shape}", "", common.table(columns, rows)]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if common.child_main({"cluster": run_cluster}, argv):
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-quickstart", action="store_true")
    parser.add_argument("--pretrain-epochs", type=int, default=None, help="default: the quickstart's own (15)")
    parser.add_argument("--synthetic", default="64000x2048x800x20", help="NxDxKxITERS, or '' to skip")
    parser.add_argument("--centres", type=int, default=100, help="the synthetic data's centres (K > centres)")
    args = parser.parse_args(argv)
    info = common.machine_info()
    started = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-storage-dtype-") as tmp:
        if not args.skip_quickstart:
            results["quickstart (digits, ResNet-18 res5)"] = quickstart(Path(tmp), args.pretrain_epochs)
        if args.synthetic:
            results["synthetic"] = synthetic(Path(tmp), args.synthetic, args.centres)
    text = report(results, info)
    print(text)
    payload = {
        "machine": info,
        "settings": vars(args),
        "results": results,
        "wall_s": time.perf_counter() - started,
        "table": text,
    }
    print(f"\nwrote {common.write_json('storage_dtype', payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
