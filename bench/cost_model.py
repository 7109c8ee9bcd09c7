"""The README's "Cost at scale": FLOPs, bytes and wall time of each step for N images, every rate
taken from our own benchmark JSON under bench/measured/ (copies of bench/results/ runs).

    python bench/cost_model.py            # print the section
    python bench/cost_model.py --write    # put it into README.md, between the cost-model markers

tests/test_cost_model.py recomputes the section from the JSON and compares it with the README, so
the README cannot drift from the measurements. A run of bench/gpu.py copied to
bench/measured/gpu.json fills the H200 column; without it the column says "not measured".
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MEASURED = HERE / "measured"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- cost-model:begin -->", "<!-- cost-model:end -->"

# The recipe (configs/pretrain/clusterfit/*in1k*.yaml, clusterfit_resnet_8gpu_imagenet.yaml).
SIZES = [1_000_000, 100_000_000, 1_000_000_000]
MODEL, IMAGE_SIZE, D, K, N_ITER, MAX_POINTS_PER_CENTROID, EPOCHS = "resnet50", 224, 2048, 16_000, 50, 256, 105
PCA_DIMS = 256
JPEG_KB = 110  # ImageNet-1k train's mean file size: a property of the data, not a rate
RECIPE_IMAGES_PER_GPU = 1_281_167 / 8  # VISSL's ImageNet recipe: one pod of 8 GPUs for 1.28 M images
DAY_S = 86_400


@dataclass(frozen=True)
class Rate:
    """A measured rate, with where it was read from."""

    what: str
    value: float
    unit: str
    source: str


def read(name: str, measured: Path = MEASURED) -> dict[str, Any]:
    return json.loads((measured / name).read_text())


@functools.cache
def forward_flop(model: str, image_size: int, classes: int, small_stem: bool = False) -> float:
    """FLOPs of one image's forward pass (2 per multiply-add), counted by torch's FlopCounterMode."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from clusterfit.models import Network

    network = Network(model, [classes] if classes else None, small_stem).eval()
    run = network if classes else network.trunk  # no head: the trunk alone, as extract runs it
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        run(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def cpu_rates(measured: Path = MEASURED) -> dict[str, Rate]:
    """The CPU node's rates: extraction img/s, k-means and assignment FLOP/s, training FLOP/s."""
    rates: dict[str, Rate] = {}
    jpeg = read("extract_jpeg-resnet50.json", measured)
    s = jpeg["settings"]
    rates["extract"] = Rate(
        f"extract step from JPEG files, {s['model']} {s['image_size']} px, {s['workers']} DataLoader workers",
        jpeg["methods"]["extract-step"]["images_per_s"] * forward_flop(s["model"], s["image_size"], 0),
        "FLOP/s",
        "extract_jpeg-resnet50.json: methods.extract-step.images_per_s x forward FLOPs",
    )
    cluster = read("cluster-custom.json", measured)
    (shape,) = [s for s in cluster["shapes"] if s["shape"]["d"] == D]
    n, k, ours = shape["shape"]["n"], shape["shape"]["k"], shape["methods"]["cluster-step"]
    pass_flop = 2.0 * n * k * D
    rates["kmeans"] = Rate(
        f"k-means training, the cluster step ({ours['algorithm']}), {N_ITER} iterations projected from"
        f" the measured ones, N={n} d={D} K={k}",
        pass_flop * N_ITER / ours["projected_s"],
        "FLOP/s",
        "cluster-custom.json: shapes[d=2048].methods.cluster-step.projected_s",
    )
    lloyd = shape["methods"]["faiss-kmeans"]
    rates["kmeans_lloyd"] = Rate(
        "for comparison, not used below: plain Lloyd (faiss.Kmeans as VISSL runs it) at the same shape;"
        " SuperKMeans prunes more on these clustered synthetic features than real ones may allow",
        pass_flop * N_ITER / lloyd["projected_s"],
        "FLOP/s",
        "cluster-custom.json: shapes[d=2048].methods.faiss-kmeans.projected_s",
    )
    assign_s = sorted(run["assign_s"] for run in ours["runs"])[len(ours["runs"]) // 2]
    rates["assign"] = Rate(
        f"assignment (faiss IndexFlat search), N={n} d={D} K={k}",
        pass_flop / assign_s,
        "FLOP/s",
        "cluster-custom.json: shapes[d=2048].methods.cluster-step.runs[].assign_s (median)",
    )
    train = read("train-resnet50.json", measured)
    s = train["settings"]
    per_image = 3 * forward_flop(s["model"], s["image_size"], s["classes"])
    rates["train"] = Rate(
        f"training (our loop, {s['model']} {s['image_size']} px, {s['classes']} classes; 3x forward FLOPs per image)",
        train["methods"]["ours"]["images_per_s"] * per_image,
        "FLOP/s",
        "train-resnet50.json: methods.ours.images_per_s x 3 x forward FLOPs",
    )
    return rates


def gpu_rates(measured: Path = MEASURED) -> dict[str, Rate] | None:
    """The H200's rates from bench/gpu.py's JSON, or None when no GPU run was copied here."""
    if not (measured / "gpu.json").exists():
        return None
    rows = read("gpu.json", measured)["rows"]

    def row(benchmark: str, setting: str) -> dict[str, Any]:
        return next(r for r in rows if r["benchmark"].startswith(benchmark) and r["setting"].startswith(setting))

    extract = row("extract", "CPU JPEG decode")
    faiss = row("k-means", "faiss-gpu")
    train = row("train", "bf16 AMP")
    return {
        "extract": Rate(
            "extract, CPU JPEG decode + bf16",
            extract["figure"] * forward_flop(MODEL, IMAGE_SIZE, 0),
            "FLOP/s",
            "gpu.json: extract img/s x forward FLOPs",
        ),
        "kmeans": Rate("k-means, faiss-gpu", faiss["tflops"] * 1e12, "FLOP/s", "gpu.json: k-means faiss-gpu tflops"),
        "assign": Rate("assignment, faiss-gpu", faiss["tflops"] * 1e12, "FLOP/s", "gpu.json: k-means faiss-gpu"),
        "train": Rate(
            "training, bf16 AMP",
            train["figure"] * 3 * forward_flop(MODEL, IMAGE_SIZE, K),
            "FLOP/s",
            "gpu.json: train img/s x 3 x forward FLOPs",
        ),
    }


@dataclass(frozen=True)
class Work:
    step: str
    flop: float
    bytes_read: float
    bytes_written: float
    formula: str
    rate: str  # the key of the rate it runs at


def work(n: int, bytes_per_value: int = 4) -> list[Work]:
    """FLOPs and bytes of each step for n images (features stored with bytes_per_value)."""
    extract_flop = forward_flop(MODEL, IMAGE_SIZE, 0)
    train_flop = 3 * forward_flop(MODEL, IMAGE_SIZE, K)
    sample = min(n, K * MAX_POINTS_PER_CENTROID)
    features = n * D * bytes_per_value
    return [
        Work(
            "extract", n * extract_flop, n * JPEG_KB * 1e3, features, f"N x {extract_flop / 1e9:.2f} GFLOP", "extract"
        ),
        Work(
            "k-means training",
            2.0 * sample * K * D * N_ITER,
            sample * D * bytes_per_value,
            K * D * 4,
            f"2 x S x K x d x {N_ITER}, S = min(N, {MAX_POINTS_PER_CENTROID}K) = {sample:,}",
            "kmeans",
        ),
        Work("assignment", 2.0 * n * K * D, features, n * 8, "2 x N x K x d", "assign"),
        Work(
            "training, per epoch",
            n * train_flop,
            n * JPEG_KB * 1e3,
            0,
            f"N x 3 x {train_flop / 3e9:.2f} GFLOP",
            "train",
        ),
        Work(
            f"training, {EPOCHS} epochs",
            EPOCHS * n * train_flop,
            EPOCHS * n * JPEG_KB * 1e3,
            0,
            f"{EPOCHS} x N x 3 x {train_flop / 3e9:.2f} GFLOP",
            "train",
        ),
    ]


def duration(s: float) -> str:
    for unit, size in (("years", 365 * DAY_S), ("days", DAY_S), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.3g} {unit}"
    return f"{s:.3g} s"


def si(value: float, unit: str) -> str:
    for prefix, size in (("Z", 1e21), ("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def time_cell(item: Work, rates: dict[str, Rate] | None) -> str:
    if rates is None:
        return "not measured"
    rate = rates[item.rate]
    return f"{si(item.flop, 'FLOP')} / {si(rate.value, 'FLOP/s')} = {duration(item.flop / rate.value)}"


def shapes(n: int) -> str:
    """The PyTorchJob shapes that keep the recipe's images per GPU (8 GPUs a pod): the chart runs
    NUM_NODES pods per step, NUM_PROC_PER_NODE processes each, and the cluster step as one rank a pod."""
    pods = max(1, math.ceil(n / RECIPE_IMAGES_PER_GPU / 8))
    return (
        f"extract and train: {pods} pod{'s' if pods > 1 else ''} x 8 GPUs (`DISTRIBUTED.NUM_NODES={pods}`,"
        f" `NUM_PROC_PER_NODE=8`, `KUBERNETES.RESOURCES.{{EXTRACT,TRAIN}}.GPUS=8`), the recipe's"
        f" {RECIPE_IMAGES_PER_GPU / 1e3:.0f} k images a GPU; cluster: the same {pods} pod{'s' if pods > 1 else ''},"
        " one rank each (`RESOURCES.CLUSTER.GPUS=1`), rank 0 training the centroids alone"
    )


def section(measured: Path = MEASURED) -> str:
    cpu, gpu = cpu_rates(measured), gpu_rates(measured)
    lines = [
        "## Cost at scale",
        "",
        "Generated by `python bench/cost_model.py --write` from the benchmark JSON in `bench/measured/`"
        " (a test recomputes it). The recipe: ResNet-50 at 224 px, features of res5 (d = 2048),"
        f" K = {K:,}, {N_ITER} k-means iterations on a sample of S = min(N, {MAX_POINTS_PER_CENTROID} K) points,"
        f" {EPOCHS} training epochs, JPEGs of {JPEG_KB} kB (ImageNet's mean). FLOPs count 2 per multiply-add"
        " (torch's FlopCounterMode on our network); training is 3x the forward pass.",
        "",
        "Rates (CPU node: the benchmark machine of the Performance section, 2 cores):",
        "",
        "| machine | what | rate | from |",
        "| --- | --- | ---: | --- |",
    ]
    for machine, rates in (("CPU node", cpu), ("H200", gpu)):
        if rates is None:
            lines.append(
                f"| {machine} | not measured (no GPU run yet: `bench/gpu.py` → `bench/measured/gpu.json`) | | |"
            )
            continue
        lines += [f"| {machine} | {r.what} | {si(r.value, r.unit)} | `{r.source}` |" for r in rates.values()]
    lines += [
        "",
        "Storage of the features (labels add 8 bytes an image):",
        "",
        "| N | float32 | float16 / bfloat16 | PCA-256 float32 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for n in SIZES:
        lines.append(f"| {n:,} | {si(n * D * 4, 'B')} | {si(n * D * 2, 'B')} | {si(n * PCA_DIMS * 4, 'B')} |")
    for n in SIZES:
        lines += [
            "",
            f"N = {n:,} ({shapes(n)}):",
            "",
            "| step | FLOPs | reads | writes (float32) | CPU node | H200 |",
            "| --- | --- | ---: | ---: | --- | --- |",
        ]
        for item in work(n):
            lines.append(
                f"| {item.step} | {item.formula} = {si(item.flop, 'FLOP')} | {si(item.bytes_read, 'B')}"
                f" | {si(item.bytes_written, 'B')} | {time_cell(item, cpu)} | {time_cell(item, gpu)} |"
            )
    return "\n".join(lines)


def replace_section(readme: str, text: str) -> str:
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{text}\n{END}{tail}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"replace the section in {README.name}")
    args = parser.parse_args(argv)
    text = section()
    if args.write:
        README.write_text(replace_section(README.read_text(), text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
