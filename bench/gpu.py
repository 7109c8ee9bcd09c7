"""The GPU figures, for a lent H200, in one call of at most 8 minutes; one table at the end.

    python bench/gpu.py --out "$OUT"          # on the GPU machine (about 3-4 minutes)
    python bench/gpu.py --dry-run             # anywhere: tiny shapes on CPU, checks the script runs

1. Extraction: ResNet-50 (random init) at 224 px through our trunk's taps (`extract.forward_features`,
   res5avg), channels_last, bf16 autocast as the extract step runs on CUDA; also fp32 (USE_AMP
   false). Agreement of bf16 features with fp32 ones on the same JPEG batches, per row: cosine
   similarity >= 0.995 and relative error |bf16 - fp32| / |fp32| <= 0.05 (the stated tolerance;
   table: the worst row and the median), for res5avg and res4 (pooled 1x1). Input from
   JPEGs (synthetic 500x375 photos-like images, encoded once): decoded on CPU by DataLoader workers
   (PIL, Resize 256, CenterCrop 224, Normalize) and, where torchvision supports it, batched
   `torchvision.io.decode_jpeg(device="cuda")` then resize/crop/normalise on the GPU.
2. k-means at the ImageNet-1K shape (N=1.28M, D=2048, K=16000) on L2-normalised blobs: faiss-gpu
   (`faiss.Kmeans(gpu=True)`, plain Lloyd, if faiss sees a GPU) and our torch backend
   (`kmeans_torch.train_torch`), `--kmeans-iters` iterations each, per-iteration time, and the time
   50 iterations take at that rate against the 90 s target (4.3 PFLOP).
3. Training: ResNet-50 with bf16 AMP and channels_last through `training.train_one_epoch` (our
   loop), a 16000-way head, batch 256, SGD, on batches already on the GPU (no input pipeline).

Writes `<out>/gpu.json` (`--out`, default $OUT if set, else bench/results).
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import numpy as np
import torch


@dataclass(frozen=True)
class Sizes:
    image_size: int = 224
    resize: int = 256
    batch: int = 256
    extract_batches: int = 24
    jpegs: int = 1024
    workers: int = 14
    n: int = 1_281_167
    d: int = 2048
    k: int = 16_000
    kmeans_iters: int = 20
    train_steps: int = 30
    model: str = "resnet50"


DRY = Sizes(
    image_size=32,
    resize=36,
    batch=4,
    extract_batches=4,
    jpegs=8,
    workers=0,
    n=3000,
    d=64,
    k=30,
    kmeans_iters=2,
    train_steps=2,
    model="resnet18",
)
Row = dict[str, Any]


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- 1. extraction -------------------------------------------------------------------------------


def make_jpegs(count: int, size: tuple[int, int] = (500, 375)) -> list[bytes]:
    """Smooth random images (so JPEG sizes are photo-like), encoded once at quality 90."""
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(count, 64)):
        small = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return [out[i % len(out)] for i in range(count)]


class JpegDataset(torch.utils.data.Dataset[torch.Tensor]):
    def __init__(self, jpegs: list[bytes], sizes: Sizes) -> None:
        from torchvision import transforms as T

        self.jpegs = jpegs
        self.transform = T.Compose(
            [
                T.Resize(sizes.resize),
                T.CenterCrop(sizes.image_size),
                T.ToTensor(),
                T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
            ]
        )

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(io.BytesIO(self.jpegs[index])) as image:
            return self.transform(image.convert("RGB"))


def extraction_model(sizes: Sizes) -> Any:
    from clusterfit.models import Network

    return Network(sizes.model).to(device()).to(memory_format=torch.channels_last).eval()


def features(model: Any, images: torch.Tensor, bf16: bool, layer: str = "res5avg") -> np.ndarray:
    from clusterfit.models import forward_features

    on_device = images.to(device(), non_blocking=True)
    return forward_features(model, on_device, [layer], 1, torch.channels_last, amp=bf16)[layer]


# bf16 features count as agreeing with fp32 ones when every row meets both.
MIN_COSINE = 0.995
MAX_RELATIVE_ERROR = 0.05


def agreement(bf16: np.ndarray, fp32: np.ndarray) -> dict[str, float]:
    """Per-row cosine similarity and relative L2 error of (N, D) bf16 features against fp32: worst and median."""
    a, b = bf16.astype(np.float64), fp32.astype(np.float64)
    norms = np.linalg.norm(b, axis=1)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * norms, 1e-30)
    relative = np.linalg.norm(a - b, axis=1) / np.maximum(norms, 1e-30)
    return {
        "min_cosine": float(cosine.min()),
        "median_cosine": float(np.median(cosine)),
        "max_relative_error": float(relative.max()),
        "median_relative_error": float(np.median(relative)),
    }


def bench_bf16_agreement(sizes: Sizes) -> list[Row]:
    """bf16 autocast vs fp32 features of the same model on the same decoded JPEG batches."""
    model = extraction_model(sizes)
    jpegs = make_jpegs(sizes.batch * 2)
    loader = torch.utils.data.DataLoader(JpegDataset(jpegs, sizes), batch_size=sizes.batch, num_workers=0)
    rows = []
    for layer in ("res5avg", "res4"):
        pairs = [(features(model, images, True, layer), features(model, images, False, layer)) for images in loader]
        stats = agreement(np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]))
        met = stats["min_cosine"] >= MIN_COSINE and stats["max_relative_error"] <= MAX_RELATIVE_ERROR
        rows.append(
            {
                "benchmark": f"extract {sizes.model} {sizes.image_size}px",
                "setting": f"bf16 vs fp32 features, {layer}, {len(jpegs)} images",
                "figure": stats["max_relative_error"],
                "unit": "max row rel. error",
                "target": f"cosine >= {MIN_COSINE}, rel. error <= {MAX_RELATIVE_ERROR}",
                "met": met,
                "correctness": True,  # a miss here is a wrong result, not a slow one: main() exits 1
                "note": f"rel. error median {stats['median_relative_error']:.4f}; cosine min "
                f"{stats['min_cosine']:.6f}, median {stats['median_cosine']:.6f}",
                **stats,
            }
        )
    return rows


def throughput(batches: Callable[[], Any], step: Callable[[Any], Any], warmup: int = 2) -> float:
    """images/s over the batches after `warmup` of them."""
    seen, start = 0, 0.0
    for i, batch in enumerate(batches()):
        if i == warmup:
            sync()
            seen, start = 0, time.perf_counter()
        step(batch)
        seen += len(batch)
    sync()
    if not start:
        raise ValueError(f"only {warmup} batches or fewer: nothing was timed after the warm-up")
    return seen / (time.perf_counter() - start)


def bench_extract(sizes: Sizes) -> list[Row]:
    model = extraction_model(sizes)
    jpegs = make_jpegs(sizes.batch * sizes.extract_batches)
    loader = torch.utils.data.DataLoader(
        JpegDataset(jpegs, sizes),
        batch_size=sizes.batch,
        num_workers=sizes.workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=sizes.workers > 0,
    )
    tensors = [torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size) for _ in range(sizes.extract_batches)]
    rows = []
    for name, batches, bf16 in (
        ("model only, fp32 (USE_AMP false)", lambda: iter(tensors), False),
        ("model only, bf16 autocast (as the extract step runs)", lambda: iter(tensors), True),
        ("CPU JPEG decode (PIL, workers) + bf16", lambda: iter(loader), True),
    ):
        rate = throughput(batches, functools.partial(features, model, bf16=bf16))
        rows.append(
            {
                "benchmark": f"extract {sizes.model} {sizes.image_size}px",
                "setting": name,
                "figure": rate,
                "unit": "img/s",
            }
        )
    rows.append(gpu_decode_row(model, jpegs, sizes))
    return rows


def gpu_decode_row(model: Any, jpegs: list[bytes], sizes: Sizes) -> Row:
    row: Row = {
        "benchmark": f"extract {sizes.model} {sizes.image_size}px",
        "setting": "GPU JPEG decode (decode_jpeg cuda) + bf16",
        "unit": "img/s",
    }
    if not torch.cuda.is_available():
        return row | {"figure": None, "note": "skipped: no CUDA"}
    import torchvision
    from torchvision.transforms.v2 import functional as F

    data = [torch.frombuffer(bytearray(j), dtype=torch.uint8) for j in jpegs]
    mean = torch.tensor([0.485, 0.456, 0.406], device="cuda").view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device="cuda").view(1, 3, 1, 1)

    def batches() -> Any:
        for start in range(0, len(data), sizes.batch):
            decoded = torchvision.io.decode_jpeg(data[start : start + sizes.batch], device="cuda")
            crops = [
                F.center_crop(F.resize(img, [sizes.resize], antialias=True), [sizes.image_size]) for img in decoded
            ]
            yield (torch.stack(crops).float() / 255 - mean) / std

    try:
        return row | {"figure": throughput(batches, lambda b: features(model, b, True))}
    except Exception as exc:  # an old torchvision without batched GPU decode
        return row | {"figure": None, "note": f"failed: {exc}"}


# ---- 2. k-means ----------------------------------------------------------------------------------


def blobs_on_host(n: int, d: int, k: int) -> np.ndarray:
    """L2-normalised float32 (n, d) blobs, generated on the GPU when there is one."""
    gen = torch.Generator(device=device()).manual_seed(0)
    centres = torch.randn(k, d, generator=gen, device=device())
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        rows = min(65536, n - start)
        x = centres[torch.randint(0, k, (rows,), generator=gen, device=device())] + 0.6 * torch.randn(
            rows, d, generator=gen, device=device()
        )
        out[start : start + rows] = torch.nn.functional.normalize(x, dim=1).cpu().numpy()
    return out


def kmeans_row(
    name: str, sizes: Sizes, seconds: float, iters: int, per_iter: float, objective: float, note: str = ""
) -> Row:
    flop_per_iter = 2.0 * sizes.n * sizes.k * sizes.d
    projected = per_iter * 50
    return {
        "benchmark": f"k-means N={sizes.n} D={sizes.d} K={sizes.k}",
        "setting": name,
        "figure": per_iter,
        "unit": "s/iter",
        "iterations": iters,
        "seconds": seconds,
        "tflops": flop_per_iter / per_iter / 1e12,
        "objective": objective,
        "projected_50_iter_s": projected,
        "target": "50 iterations < 90 s",
        "met": projected < 90 if torch.cuda.is_available() else None,
        "note": note,
    }


def bench_faiss(x: np.ndarray, sizes: Sizes) -> Row:
    try:
        import faiss
    except ImportError:
        return {
            "benchmark": f"k-means N={sizes.n} D={sizes.d} K={sizes.k}",
            "setting": "faiss-gpu",
            "figure": None,
            "unit": "s/iter",
            "note": "skipped: faiss not installed",
        }
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    km = faiss.Kmeans(
        sizes.d, sizes.k, niter=sizes.kmeans_iters, seed=0, max_points_per_centroid=256, gpu=gpus if gpus else False
    )
    start = time.perf_counter()
    km.train(x)
    seconds = time.perf_counter() - start
    cumulative = [float(s["time"]) for s in km.iteration_stats]
    per_iter = float(np.median(np.diff([0.0, *cumulative])))
    name = "faiss-gpu Lloyd" if gpus else "faiss (CPU: faiss sees no GPU; carry a faiss-gpu wheel)"
    return kmeans_row(name, sizes, seconds, len(km.obj), per_iter, float(km.obj[-1]))


def bench_torch_kmeans(x: np.ndarray, sizes: Sizes) -> Row:
    from clusterfit import kmeans_torch

    start = time.perf_counter()
    trained = kmeans_torch.train_torch(x, sizes.k, niter=sizes.kmeans_iters, seed=0, max_points_per_centroid=256)
    seconds = time.perf_counter() - start
    # train_s excludes the host-to-device copy of x and the initial centroid draw.
    return kmeans_row(
        f"our torch backend ({trained.algorithm})",
        sizes,
        seconds,
        len(trained.objective),
        trained.train_s / len(trained.objective),
        trained.objective[-1],
        f"host->device copy etc. {seconds - trained.train_s:.1f}s",
    )


# ---- 3. training ---------------------------------------------------------------------------------


def bench_train(sizes: Sizes) -> Row:
    from torch import nn

    from clusterfit import training
    from clusterfit.checkpoint import TrainState
    from clusterfit.config import OptimizerConfig
    from clusterfit.models import Network

    torch.manual_seed(0)
    model = Network(sizes.model, [sizes.k]).to(device()).to(memory_format=torch.channels_last)
    opt_cfg = OptimizerConfig(BASE_LR=0.1, BASE_LR_BATCH_SIZE=sizes.batch, WARMUP_EPOCHS=0)
    optimizer = training.build_optimizer(model, opt_cfg)
    steps = sizes.train_steps
    batches = [
        (
            torch.randn(sizes.batch, 3, sizes.image_size, sizes.image_size, device=device()),
            torch.randint(0, sizes.k, (sizes.batch,), device=device()),
        )
        for _ in range(4)
    ]
    ctx = training.EpochContext(
        model=model,
        optimizer=optimizer,
        loss_fn=nn.CrossEntropyLoss(),
        device=device(),
        amp=torch.cuda.is_available(),
        lr_fn=lambda epoch: 0.1,
        batches_per_epoch=steps,
        batch_fn=lambda x, y: (x, y),
        on_step=lambda state: None,
        memory_format=torch.channels_last,
        progress_interval_s=3600,
    )
    training.train_one_epoch(ctx, [batches[i % 4] for i in range(3)], TrainState(), 0)  # warm-up
    sync()
    start = time.perf_counter()
    training.train_one_epoch(ctx, [batches[i % 4] for i in range(steps)], TrainState(), 0)
    sync()
    rate = steps * sizes.batch / (time.perf_counter() - start)
    return {
        "benchmark": f"train {sizes.model} {sizes.image_size}px",
        "setting": f"bf16 AMP, channels_last, batch {sizes.batch}, train_one_epoch",
        "figure": rate,
        "unit": "img/s",
        "target": ">= 2500 img/s",
        "met": rate >= 2500 if torch.cuda.is_available() else None,
    }


# ---- the run -------------------------------------------------------------------------------------


def guarded(name: str, fn: Callable[[], Any]) -> list[Row]:
    """Run one section; a failure becomes a row, so one broken section does not lose the others."""
    start = time.perf_counter()
    try:
        out = fn()
        rows = out if isinstance(out, list) else [out]
    except Exception as exc:
        traceback.print_exc()
        rows = [
            {
                "benchmark": name,
                "setting": "error",
                "figure": None,
                "unit": "",
                "note": f"{type(exc).__name__}: {exc}"[:300],
            }
        ]
    print(f"[gpu] {name} done in {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    return rows


def gpu_info() -> dict[str, Any]:
    info = common.machine_info()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    else:
        info["gpu"] = "none (CPU dry run)"
    return info


def report(rows: list[Row], info: dict[str, Any]) -> str:
    def figure(r: Row) -> str:
        return common.fmt(float(r["figure"])) if r.get("figure") is not None else "-"

    table_rows = [
        [
            r["benchmark"],
            r["setting"],
            figure(r),
            r["unit"],
            common.fmt(r["projected_50_iter_s"]) if "projected_50_iter_s" in r else "-",
            r.get("target", "-"),
            common.verdict(r.get("met")),
            r.get("note", ""),
        ]
        for r in rows
    ]
    head = f"GPU benchmark on {info['gpu']} (host: {common.hardware_line(info)})"
    return (
        head
        + "\n\n"
        + common.table(["benchmark", "setting", "figure", "unit", "50 iter s", "target", "verdict", "note"], table_rows)
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes (CPU is fine): checks that every section runs"
    )
    parser.add_argument("--out", default=os.environ.get("OUT") or str(common.RESULTS))
    parser.add_argument(
        "--kmeans-iters", type=int, default=None, help="k-means iterations (default 20; 50 is the full recipe)"
    )
    parser.add_argument("--skip", nargs="*", default=[], choices=["extract", "kmeans", "train"])
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else Sizes()
    if args.kmeans_iters:
        sizes = Sizes(**{**sizes.__dict__, "kmeans_iters": args.kmeans_iters})
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    info, rows = gpu_info(), []
    if "extract" not in args.skip:
        rows += guarded("extract", lambda: bench_extract(sizes))
        rows += guarded("bf16 agreement", lambda: bench_bf16_agreement(sizes))
    if "kmeans" not in args.skip:
        x = blobs_on_host(sizes.n, sizes.d, sizes.k)
        rows += guarded("k-means faiss", lambda: bench_faiss(x, sizes))
        rows += guarded("k-means torch", lambda: bench_torch_kmeans(x, sizes))
        del x
    if "train" not in args.skip:
        rows += guarded("train", lambda: bench_train(sizes))
    text = report(rows, info)
    print(text)
    out = Path(args.out)
    name = "gpu-dry-run" if args.dry_run else "gpu"
    path = common.write_json(name, {"machine": info, "sizes": sizes.__dict__, "rows": rows, "table": text}, out)
    print(f"\nwrote {path}", file=sys.stderr)
    crashed = [r for r in rows if r.get("setting") == "error"]
    wrong = [r for r in rows if r.get("correctness") and not r.get("met")]
    for r in wrong:
        print(f"bench/gpu.py: {r['setting']} outside {r['target']}: {r['note']}", file=sys.stderr)
    return 1 if crashed or wrong else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
