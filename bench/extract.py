"""The extract step against a plain torchvision loop: images/s and peak memory, same images.

    python bench/extract.py              # ResNet-18 at 64 px, batch 64, 256 and 2560 images
    python bench/extract.py --quick      # a smoke run
    python bench/extract.py --model resnet50 --image-size 96

Methods, each in its own process, interleaved and rotated per repeat, on the same synthetic images
(`DATA_SOURCES: [synthetic]`, decoded and transformed by the same Resize/CenterCrop/ToTensor/
Normalize), the same randomly initialised model, batch size, DataLoader workers and torch threads:
- `extract-step`: `clusterfit.steps.extract.run(cfg)` to published parts: chunked DataLoader, trunk taps
  (res5avg), one part file per CHUNK_SIZE images, markers, manifest; channels_last (the default).
- `plain`: what a user writes: `torchvision.models.get_model(name)` with `fc = Identity()`,
  `DataLoader(dataset, batch_size)`, `model(x)` under inference_mode, features appended to a list,
  one `np.save` at the end; contiguous tensors (torchvision's default).
- `plain-cl`: the same loop with the model and inputs in channels_last.

Each runs at 1x (one chunk) and 10x the images: images/s is taken at 10x, and the step's peak
memory at 10x against 1x shows that it is bounded by a chunk. Seconds include building the model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

SCRIPT = str(Path(__file__).resolve())
METHODS = ["extract-step", "plain", "plain-cl"]
LAYER = "res5avg"


def step_config(p: dict[str, Any]) -> Any:
    from clusterfit.config import load_config

    size = p["image_size"]
    return load_config(
        overrides={
            "EXPERIMENT": {"NAME": "bench", "ROOT": Path(p["root"]).as_uri(), "SEED": 0},
            "PIPELINE": {"STEPS": ["extract"]},
            "MODEL": {"TRUNK": {"NAME": p["model"]}},
            "DATA": {
                "TRAIN": {
                    "DATA_SOURCES": ["synthetic"],
                    "SYNTHETIC_SIZE": p["images"],
                    "IMAGE_SIZE": size,
                    "BATCHSIZE_PER_REPLICA": p["batch"],
                },
                "TEST": {"DATA_SOURCES": []},
                "NUM_DATALOADER_WORKERS": p["workers"],
                "TRANSFORMS": {"EVAL_RESIZE": size, "EVAL_CROP_SIZE": size},
            },
            "EXTRACT": {"PARTITIONS": ["TRAIN"], "CHUNK_SIZE": p["chunk"]},
            "CLUSTERFIT": {"FEATURES": {"LAYER_NAME": LAYER}},
            "LOG": {"PROGRESS_INTERVAL_S": 3600},
        }
    )


def run_step(p: dict[str, Any]) -> dict[str, Any]:
    import torch

    from clusterfit.steps import extract

    torch.set_num_threads(p["threads"])
    cfg = step_config(p)
    start_rss = common.rss_mb()
    start = time.perf_counter()
    result = extract.run(cfg)
    seconds = time.perf_counter() - start
    assert result.chunks_computed == -(-p["images"] // p["chunk"]), result
    return {"seconds": seconds, "start_rss_mb": start_rss}


def run_plain(p: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    import torchvision

    from clusterfit.data import build_dataset, eval_transform

    torch.set_num_threads(p["threads"])
    cfg = step_config(p)  # only to build the same images and transform
    dataset = build_dataset(cfg, "TRAIN", eval_transform(cfg.DATA.TRANSFORMS))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    start_rss = common.rss_mb()
    start = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.get_model(p["model"], weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(memory_format=fmt)
    loader = torch.utils.data.DataLoader(dataset, batch_size=p["batch"], num_workers=p["workers"])
    feats = []
    with torch.inference_mode():
        for images, _, _ in loader:
            feats.append(model(images.contiguous(memory_format=fmt)).numpy())
    np.save(Path(p["root"]) / "features.npy", np.concatenate(feats))
    return {"seconds": time.perf_counter() - start, "start_rss_mb": start_rss}


CHILDREN: dict[str, common.Method] = {
    "extract-step": run_step,
    "plain": lambda p: run_plain(p, channels_last=False),
    "plain-cl": lambda p: run_plain(p, channels_last=True),
}


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    sizes = {"1x": args.chunk, "10x": 10 * args.chunk}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {m: {s: [] for s in sizes} for m in args.methods}
    for rep in range(args.repeats):
        order = args.methods[rep % len(args.methods) :] + args.methods[: rep % len(args.methods)]
        for label, images in sizes.items():
            for method in order:
                root = Path(tempfile.mkdtemp(dir=tmp))
                params = {
                    "root": str(root),
                    "model": args.model,
                    "image_size": args.image_size,
                    "batch": args.batch,
                    "workers": args.workers,
                    "threads": args.threads,
                    "chunk": args.chunk,
                    "images": images,
                }
                result = common.run_child(SCRIPT, method, params)
                result["images_per_s"] = images / result["seconds"]
                runs[method][label].append(result)
                print(
                    f"rep {rep} {method} {label}: {result['images_per_s']:.1f} img/s, {result['peak_rss_mb']:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    return runs


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for method, by_size in runs.items():
        out[method] = {
            "images_per_s_10x": common.median([r["images_per_s"] for r in by_size["10x"]]),
            "images_per_s_1x": common.median([r["images_per_s"] for r in by_size["1x"]]),
            "peak_rss_mb_1x": common.median([r["peak_rss_mb"] for r in by_size["1x"]]),
            "peak_rss_mb_10x": common.median([r["peak_rss_mb"] for r in by_size["10x"]]),
            "start_rss_mb": common.median([r["start_rss_mb"] for r in by_size["10x"]]),
            "runs": by_size,
        }
    return out


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    step, out = summary.get("extract-step"), []
    if step and "plain" in summary:
        ratio = step["images_per_s_10x"] / summary["plain"]["images_per_s_10x"]
        out.append(
            {"target": "extract >= 0.9x the plain loop's images/s", "figure": f"{ratio:.2f}x", "met": ratio >= 0.9}
        )
    if step and "plain-cl" in summary:
        ratio = step["images_per_s_10x"] / summary["plain-cl"]["images_per_s_10x"]
        out.append(
            {
                "target": "extract >= 0.9x the plain loop in channels_last",
                "figure": f"{ratio:.2f}x",
                "met": ratio >= 0.9,
            }
        )
    if step:
        growth = step["peak_rss_mb_10x"] / step["peak_rss_mb_1x"] - 1
        out.append(
            {
                "target": "extract peak memory at 10x within 10% of 1x",
                "figure": f"{100 * growth:+.1f}%",
                "met": growth <= 0.10,
            }
        )
    return out


def report(summary: dict[str, dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    base = summary.get("plain")
    rows = [
        [
            method,
            s["images_per_s_10x"],
            f"{s['images_per_s_10x'] / base['images_per_s_10x']:.2f}x" if base else "-",
            s["images_per_s_1x"],
            s["start_rss_mb"],
            s["peak_rss_mb_1x"],
            s["peak_rss_mb_10x"],
            f"{100 * (s['peak_rss_mb_10x'] / s['peak_rss_mb_1x'] - 1):+.1f}%",
        ]
        for method, s in summary.items()
    ]
    columns = [
        "method",
        "img/s (10x)",
        "x plain",
        "img/s (1x)",
        "RSS after imports MB",
        "peak RSS 1x MB",
        "peak RSS 10x MB",
        "10x vs 1x",
    ]
    return "\n".join(
        [
            f"extract benchmark on {common.hardware_line(info)}",
            f"{args.model} (random init, res5avg), {args.image_size} px synthetic images, batch {args.batch}, "
            f"{args.workers} DataLoader "
            f"workers, {args.threads} torch threads; 1x = {args.chunk} images (one chunk), 10x = {10 * args.chunk}; "
            f"median of {args.repeats}",
            "",
            common.table(columns, rows),
            "",
            common.targets_table(targets(summary)),
        ]
    )


def main(argv: list[str]) -> int:
    if common.child_main(CHILDREN, argv):
        return 0
    parser = common.model_parser(__doc__, "a smoke run: 32 px, chunk 64, one repeat", METHODS)
    parser.add_argument("--chunk", type=int, default=256, help="EXTRACT.CHUNK_SIZE, and the 1x dataset size")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.chunk, args.repeats = 32, 64, 1
    info = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        summary = summarise(bench(args, Path(tmp)))
    common.publish("extract", args, info, summary, report(summary, args, info), targets(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
