"""The extract step against a plain torchvision loop on real JPEG files, and where the time goes.

    python bench/extract_jpeg.py                       # ResNet-18, 1000 JPEGs, 224 px, 2 workers, 3 repeats
    python bench/extract_jpeg.py --images 64 --repeats 1   # a smoke run
    python bench/extract_jpeg.py --model resnet50 --images 512

The images: scikit-learn's bundled 8x8 digits (no download), upscaled (bicubic) to --jpeg-size px
RGB and saved as JPEG (quality --quality) in an ImageFolder tree `<tmp>/<digit>/<i>.jpg`, made
once per run (the digits repeat past 1,797 images). The JPEGs are larger than the resize (320 vs
256 by default) so Resize resamples, as it does on photos. Same transform on every side:
Resize(--resize) -> CenterCrop(--image-size) -> ToTensor -> Normalize(ImageNet mean/std).

Methods, each in its own process, interleaved and rotated per repeat:
- `extract-step`: `clusterfit.steps.extract.run(cfg)` with `DATA_SOURCES: [disk_folder]` on the
  tree, to published parts (res5avg); channels_last (the step's default).
- `plain`: what a user writes: `ImageFolder(tree, transform)`, `DataLoader(batch_size,
  num_workers)`, `get_model(name)` with `fc = Identity()`, `model(x)` under inference_mode,
  features to numpy, one `np.save`; contiguous tensors. `plain-cl` (not by default): the same in
  channels_last.
- the breakdown, in one process, one thread for decode and transform: `decode` (bytes already in
  memory -> `Image.open(...).convert("RGB")`, every image), `transform` (the transform on up to
  --sample decoded images), `forward` / `forward-cl` (the model on one pre-built random batch,
  contiguous / channels_last, --forward-batches timed batches after one warm-up).

The step and the plain loop start from the same seed, so their features must agree (the check is
printed). Seconds include building the model and listing the tree. DataLoader workers decode and
transform beside the forward, so on C cores the loop takes about max(forward, (decode +
transform) / workers) per image when the cores are free, not the sum.
"""

from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

SCRIPT = str(Path(__file__).resolve())
METHODS = ["extract-step", "plain", "plain-cl", "decode", "transform", "forward", "forward-cl"]
DEFAULT_METHODS = ["extract-step", "plain", "decode", "transform", "forward", "forward-cl"]
LAYER = "res5avg"
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


# ---- the JPEG tree -------------------------------------------------------------------------------


def make_tree(root: Path, images: int, side: int, quality: int) -> dict[str, Any]:
    """`images` digits as side x side RGB JPEGs in `<root>/<digit>/<i>.jpg`; their count and bytes."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    total_bytes = 0
    for i in range(images):
        k = i % len(pixels)
        gray = Image.fromarray(pixels[k], mode="L").resize((side, side), Image.Resampling.BICUBIC)
        path = root / str(digits.target[k]) / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        gray.convert("RGB").save(path, "JPEG", quality=quality)
        total_bytes += path.stat().st_size
    return {"images": images, "jpeg_bytes_mean": total_bytes / images}


def jpeg_paths(tree: str) -> list[str]:
    """The tree's files in ImageFolder's order (the order the step promises too)."""
    from torchvision.datasets import ImageFolder

    return [path for path, _ in ImageFolder(tree).samples]


# ---- the methods (each in a child process) -------------------------------------------------------


def step_config(p: dict[str, Any]) -> Any:
    from clusterfit.config import load_config

    return load_config(
        overrides={
            "EXPERIMENT": {"NAME": "bench", "ROOT": Path(p["root"]).as_uri(), "SEED": 0},
            "PIPELINE": {"STEPS": ["extract"]},
            "MODEL": {"TRUNK": {"NAME": p["model"]}},
            "DATA": {
                "TRAIN": {
                    "DATA_SOURCES": ["disk_folder"],
                    "DATA_PATHS": [p["tree"]],
                    "BATCHSIZE_PER_REPLICA": p["batch"],
                },
                "TEST": {"DATA_SOURCES": []},
                "NUM_DATALOADER_WORKERS": p["workers"],
                "TRANSFORMS": {"EVAL_RESIZE": p["resize"], "EVAL_CROP_SIZE": p["crop"], "MEAN": MEAN, "STD": STD},
            },
            "EXTRACT": {"PARTITIONS": ["TRAIN"]},
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
    extract.run(cfg)
    return {"seconds": time.perf_counter() - start, "images": p["images"], "start_rss_mb": start_rss}


def plain_transform(p: dict[str, Any]) -> Any:
    from torchvision import transforms as T

    return T.Compose([T.Resize(p["resize"]), T.CenterCrop(p["crop"]), T.ToTensor(), T.Normalize(MEAN, STD)])


def plain_model(p: dict[str, Any], channels_last: bool) -> Any:
    import torch
    import torchvision

    torch.manual_seed(0)  # the step's EXPERIMENT.SEED: the same random weights
    model = torchvision.models.get_model(p["model"], weights=None)
    model.fc = torch.nn.Identity()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return model.eval().to(memory_format=fmt)


def run_plain(p: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    from torchvision.datasets import ImageFolder

    torch.set_num_threads(p["threads"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    start_rss = common.rss_mb()
    start = time.perf_counter()
    model = plain_model(p, channels_last)
    dataset = ImageFolder(p["tree"], transform=plain_transform(p))
    loader = torch.utils.data.DataLoader(dataset, batch_size=p["batch"], num_workers=p["workers"])
    feats = []
    with torch.inference_mode():
        for images, _ in loader:
            feats.append(model(images.contiguous(memory_format=fmt)).numpy())
    np.save(Path(p["root"]) / "features.npy", np.concatenate(feats))
    return {"seconds": time.perf_counter() - start, "images": len(dataset), "start_rss_mb": start_rss}


def run_decode(p: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    blobs = [Path(path).read_bytes() for path in jpeg_paths(p["tree"])]
    start = time.perf_counter()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as image:
            image.convert("RGB")
    return {"seconds": time.perf_counter() - start, "images": len(blobs)}


def run_transform(p: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image

    torch.set_num_threads(1)  # as in a DataLoader worker
    decoded = [Image.open(path).convert("RGB") for path in jpeg_paths(p["tree"])[: p["sample"]]]
    transform = plain_transform(p)
    start = time.perf_counter()
    for image in decoded:
        transform(image)
    return {"seconds": time.perf_counter() - start, "images": len(decoded)}


def run_forward(p: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    import torch

    torch.set_num_threads(p["threads"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = plain_model(p, channels_last)
    batch = torch.randn(p["batch"], 3, p["crop"], p["crop"]).contiguous(memory_format=fmt)
    with torch.inference_mode():
        model(batch)  # warm-up: oneDNN primitives, allocator
        start = time.perf_counter()
        for _ in range(p["forward_batches"]):
            model(batch)
    return {"seconds": time.perf_counter() - start, "images": p["batch"] * p["forward_batches"]}


CHILDREN: dict[str, common.Method] = {
    "extract-step": run_step,
    "plain": lambda p: run_plain(p, channels_last=False),
    "plain-cl": lambda p: run_plain(p, channels_last=True),
    "decode": run_decode,
    "transform": run_transform,
    "forward": lambda p: run_forward(p, channels_last=False),
    "forward-cl": lambda p: run_forward(p, channels_last=True),
}


# ---- running, checking, summarising --------------------------------------------------------------


def features_gap(step_root: Path, plain_root: Path) -> float:
    """max |step - plain| / max |plain| over every feature: the two did the same work when it is small."""
    import numpy as np

    folder = step_root / "features" / "train" / LAYER
    parts = sorted((p for p in folder.glob("part-*.npy") if not p.stem.endswith("-index")), key=chunk_of)
    step = np.concatenate([np.load(p) for p in parts])
    plain = np.load(plain_root / "features.npy")
    if step.shape != plain.shape:
        return float("inf")
    return float(np.abs(step - plain).max() / np.abs(plain).max())


def chunk_of(part: Path) -> int:
    return int(part.stem.split("-")[2])


def bench(args: argparse.Namespace, tmp: Path, tree: Path) -> tuple[dict[str, list[dict[str, Any]]], float | None]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    gap = None
    for rep in range(args.repeats):
        order = args.methods[rep % len(args.methods) :] + args.methods[: rep % len(args.methods)]
        roots = {}
        for method in order:
            roots[method] = Path(tempfile.mkdtemp(dir=tmp))
            params = child_params(args, tree, roots[method])
            result = common.run_child(SCRIPT, method, params)
            result["images_per_s"] = result["images"] / result["seconds"]
            runs[method].append(result)
            print(
                f"rep {rep} {method}: {result['images_per_s']:.1f} img/s, {result['peak_rss_mb']:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
        if gap is None and {"extract-step", "plain"} <= set(roots):
            gap = features_gap(roots["extract-step"], roots["plain"])
        for root in roots.values():
            shutil.rmtree(root, ignore_errors=True)
    return runs, gap


def child_params(args: argparse.Namespace, tree: Path, root: Path) -> dict[str, Any]:
    return {
        "tree": str(tree),
        "root": str(root),
        "images": args.images,
        "model": args.model,
        "resize": args.resize,
        "crop": args.image_size,
        "batch": args.batch,
        "workers": args.workers,
        "threads": args.threads,
        "sample": args.sample,
        "forward_batches": args.forward_batches,
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians per method; `x_plain` is the median over repeats of this run's img/s over plain's in the same
    repeat (measured minutes apart)."""
    base = runs.get("plain")
    out = {}
    for method, results in runs.items():
        images_per_s = common.median([r["images_per_s"] for r in results])
        ratios = [m["images_per_s"] / b["images_per_s"] for m, b in zip(results, base, strict=True)] if base else []
        out[method] = {
            "images_per_s": images_per_s,
            "ms_per_image": 1000 / images_per_s,
            "peak_rss_mb": common.median([r["peak_rss_mb"] for r in results]),
            "x_plain": common.median(ratios) if base else None,
            "runs": [{k: v for k, v in r.items() if k != "stderr_tail"} for r in results],
        }
    return out


# ---- the report ----------------------------------------------------------------------------------


def where_the_time_goes(summary: dict[str, dict[str, Any]], workers: int) -> str:
    """One line: the stages' ms/image in one process against the loops' ms/image."""
    ms = {m: f"{s['ms_per_image']:.1f} ms" for m, s in summary.items()}
    prep = [m for m in ("decode", "transform") if m in summary]
    lines = []
    if prep:
        total = sum(summary[m]["ms_per_image"] for m in prep)
        lines.append(
            f"{' + '.join(f'{m} {ms[m]}' for m in prep)} = {total:.1f} ms (one thread; {workers} workers share it)"
        )
    lines += [f"{m} {ms[m]}" for m in ("forward", "forward-cl") if m in summary]
    loops = [f"{m} {ms[m]}" for m in ("plain", "plain-cl", "extract-step") if m in summary]
    return f"per image: {'; '.join(lines)}; loops: {', '.join(loops) or '-'}"


def report(
    summary: dict[str, dict[str, Any]], args: argparse.Namespace, info: dict[str, Any], data: dict[str, Any]
) -> str:
    rows = [
        [
            method,
            s["images_per_s"],
            s["ms_per_image"],
            s["peak_rss_mb"],
            f"{s['x_plain']:.2f}x" if s["x_plain"] is not None else "-",
        ]
        for method, s in summary.items()
    ]
    gap = data.get("features_gap")
    check = "-" if gap is None else f"max |step - plain| / max |plain| = {gap:.1e}"
    return "\n".join(
        [
            f"extract on JPEG files, {common.hardware_line(info)}, torchvision {info['versions']['torchvision']}",
            f"{args.model} (random init, {LAYER}), {args.images} JPEGs of {args.jpeg_size} px "
            f"(q{args.quality}, {data['jpeg_bytes_mean'] / 1024:.1f} KiB mean) -> Resize {args.resize} -> "
            f"CenterCrop {args.image_size}; batch {args.batch}, {args.workers} DataLoader workers, "
            f"{args.threads} torch threads; median of {args.repeats}; features check: {check}",
            "",
            common.table(["method", "img/s", "ms/img", "peak RSS MB", "x plain"], rows),
            "",
            where_the_time_goes(summary, args.workers),
        ]
    )


def main(argv: list[str]) -> int:
    if common.child_main(CHILDREN, argv):
        return 0
    parser = common.model_parser(__doc__, "a smoke run: 64 images, one repeat", METHODS)
    parser.set_defaults(image_size=224, workers=2, repeats=3, methods=DEFAULT_METHODS)
    parser.add_argument("--images", type=int, default=1000, help="JPEG files in the tree")
    parser.add_argument("--jpeg-size", type=int, default=320, help="side of the saved JPEGs in pixels")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--resize", type=int, default=256, help="Resize (shorter side) before the centre crop")
    parser.add_argument("--sample", type=int, default=256, help="images the transform row is timed on")
    parser.add_argument("--forward-batches", type=int, default=3, help="timed batches of the forward rows")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 64, 1
    info = common.machine_info()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-extract-jpeg-") as tmp:
        tree = Path(tmp) / "images"
        data = make_tree(tree, args.images, args.jpeg_size, args.quality)
        runs, data["features_gap"] = bench(args, Path(tmp), tree)
    summary = summarise(runs)
    text = report(summary, args, info, data)
    print(text)
    payload = {
        "command": [sys.executable, *sys.argv],
        "machine": info,
        "settings": vars(args),
        "data": data,
        "methods": summary,
        "wall_s": time.perf_counter() - started,
        "table": text,
    }
    name = "extract_jpeg-quick" if args.quick else "extract_jpeg"
    if args.model != "resnet18":  # the cost model's run: bench/measured/extract_jpeg-resnet50.json
        name += f"-{args.model}"
    print(f"\nwrote {common.write_json(name, payload)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
