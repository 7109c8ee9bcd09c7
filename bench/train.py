"""Our training loop against a plain torchvision reference loop: images/s, same everything else.

    python bench/train.py             # ResNet-18, 64 px, batch 64, 8 timed steps, 2 repeats
    python bench/train.py --quick     # a smoke run

Methods, each in its own process, interleaved and rotated per repeat. All use the same synthetic
images and augmentations (RandomResizedCrop, ColorJitter, flip, ToTensor, Normalize: the step's
`train_transform`), the same randomly initialised ResNet with a K-way head, batch, SGD (momentum
0.9, weight decay 1e-4, lr 0.1), cross-entropy, DataLoader workers and torch threads:
- `ours` / `ours-contiguous`: `clusterfit.training.train_one_epoch` with the EpochContext that
  `clusterfit.training` builds (`training.epoch_context`: LR schedule per step, finite-loss check, on_step
  checkpoint hook) and fit's DataLoader over `training.epoch_batches`; MODEL.CHANNELS_LAST true
  (our default, also on CPU) or false.
- `plain` / `plain-cl`: torchvision's references/classification loop in its simplest form:
  `get_model(name, num_classes=K)`, `DataLoader(shuffle=True, drop_last=True)`, forward, loss,
  zero_grad, backward, step; contiguous (what torchvision does) or channels_last.

Each process runs WARMUP_STEPS untimed steps first, then `--steps` timed steps.
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
METHODS = ["ours", "plain", "plain-cl", "ours-contiguous"]
WARMUP_STEPS = 2


def config(p: dict[str, Any], channels_last: bool) -> Any:
    from clusterfit.config import load_config

    size = p["image_size"]
    return load_config(
        overrides={
            "EXPERIMENT": {"NAME": "bench", "ROOT": Path(p["root"]).as_uri(), "SEED": 0},
            "PIPELINE": {"STEPS": ["train"]},
            "MODEL": {"TRUNK": {"NAME": p["model"]}, "CHANNELS_LAST": channels_last},
            "DATA": {
                "TRAIN": {
                    "DATA_SOURCES": ["synthetic"],
                    "SYNTHETIC_SIZE": p["batch"] * (p["steps"] + WARMUP_STEPS),
                    "IMAGE_SIZE": size,
                    "BATCHSIZE_PER_REPLICA": p["batch"],
                },
                "TEST": {"DATA_SOURCES": []},
                "NUM_DATALOADER_WORKERS": p["workers"],
                "TRANSFORMS": {"TRAIN_CROP_SIZE": size},
            },
            "CLUSTERFIT": {"NUM_CLUSTERS": p["classes"]},
            "OPTIMIZER": {"BASE_LR": 0.1, "BASE_LR_BATCH_SIZE": p["batch"], "WARMUP_EPOCHS": 0, "NUM_EPOCHS": 1},
            "LOG": {"PROGRESS_INTERVAL_S": 3600},
        }
    )


def images_and_targets(cfg: Any, classes: int) -> Any:
    import numpy as np

    from clusterfit.data import build_dataset, train_transform
    from clusterfit.training import LabelledDataset

    images = build_dataset(cfg, "TRAIN", train_transform(cfg.DATA.TRANSFORMS))
    return LabelledDataset(images, np.arange(len(images)) % classes)


def run_ours(p: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    import torch

    from clusterfit import distributed, training
    from clusterfit.checkpoint import TrainState
    from clusterfit.models import build_network
    from clusterfit.storage import open_store

    torch.set_num_threads(p["threads"])
    cfg = config(p, channels_last)
    dataset = images_and_targets(cfg, p["classes"])
    dist = distributed.init_distributed()
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    torch.manual_seed(0)
    model = build_network(cfg.MODEL.TRUNK, [p["classes"]]).to(dist.device)
    if cfg.MODEL.CHANNELS_LAST:  # as training.fit does
        model = model.to(memory_format=torch.channels_last)
    optimizer = training.build_optimizer(model, cfg.OPTIMIZER)
    job = training.FitJob(
        "train", "train", model, dataset, lambda x, y: (x, y), cfg.OPTIMIZER, p["batch"], "bench", {}, {}
    )
    ctx = training.epoch_context(cfg, store, job, model, optimizer, dist)

    def epoch(skip: int, count: int) -> float:
        batches = training.epoch_batches(len(dataset), 0, cfg.EXPERIMENT.SEED, 0, 1, p["batch"], skip=skip)[:count]
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=batches, num_workers=cfg.DATA.NUM_DATALOADER_WORKERS
        )
        start = time.perf_counter()
        training.train_one_epoch(ctx, loader, TrainState(step_in_epoch=skip), 0)
        return time.perf_counter() - start

    epoch(0, WARMUP_STEPS)
    seconds = epoch(WARMUP_STEPS, p["steps"])
    return {"seconds": seconds, "images_per_s": p["steps"] * p["batch"] / seconds}


def run_plain(p: dict[str, Any], channels_last: bool) -> dict[str, Any]:
    import torch
    import torchvision

    torch.set_num_threads(p["threads"])
    cfg = config(p, channels_last)
    dataset = images_and_targets(cfg, p["classes"])
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = torchvision.models.get_model(p["model"], weights=None, num_classes=p["classes"]).to(memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=p["batch"], shuffle=True, drop_last=True, num_workers=p["workers"]
    )
    model.train()
    seconds, start = 0.0, time.perf_counter()
    for step, (images, targets, _) in enumerate(loader):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loss = loss_fn(model(images.contiguous(memory_format=fmt)), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images_per_s": p["steps"] * p["batch"] / seconds}


CHILDREN: dict[str, common.Method] = {
    "ours": lambda p: run_ours(p, channels_last=True),
    "ours-contiguous": lambda p: run_ours(p, channels_last=False),
    "plain": lambda p: run_plain(p, channels_last=False),
    "plain-cl": lambda p: run_plain(p, channels_last=True),
}


def bench(args: argparse.Namespace, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    params = {
        "root": str(tmp),
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "steps": args.steps,
        "workers": args.workers,
        "threads": args.threads,
        "classes": args.classes,
    }
    for rep in range(args.repeats):
        for method in args.methods[rep % len(args.methods) :] + args.methods[: rep % len(args.methods)]:
            result = common.run_child(SCRIPT, method, params)
            runs[method].append(result)
            print(f"rep {rep} {method}: {result['images_per_s']:.1f} img/s", file=sys.stderr, flush=True)
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {
        m: {
            "images_per_s": common.median([r["images_per_s"] for r in rs]),
            "all": [r["images_per_s"] for r in rs],
            "peak_rss_mb": common.median([r["peak_rss_mb"] for r in rs]),
        }
        for m, rs in runs.items()
    }


def targets(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ours, plain, what in (
        ("ours", "plain", "as each runs by default"),
        ("ours", "plain-cl", "both channels_last"),
        ("ours-contiguous", "plain", "both contiguous"),
    ):
        if ours in summary and plain in summary:
            ratio = summary[ours]["images_per_s"] / summary[plain]["images_per_s"]
            out.append(
                {
                    "target": f"train >= 0.95x the plain loop ({what}: {ours} / {plain})",
                    "figure": f"{ratio:.2f}x",
                    "met": ratio >= 0.95,
                }
            )
    return out


def report(summary: dict[str, dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    base = summary.get("plain")
    rows = [
        [
            m,
            s["images_per_s"],
            f"{s['images_per_s'] / base['images_per_s']:.2f}x" if base else "-",
            " ".join(f"{v:.1f}" for v in s["all"]),
            s["peak_rss_mb"],
        ]
        for m, s in summary.items()
    ]
    return "\n".join(
        [
            f"train benchmark on {common.hardware_line(info)}",
            f"{args.model} ({args.classes} classes), {args.image_size} px synthetic images with the training "
            "augmentations, batch "
            f"{args.batch}, SGD, {args.workers} DataLoader workers, {args.threads} torch threads; {args.steps} timed "
            "steps after "
            f"{WARMUP_STEPS} warm-up steps; median of {args.repeats}",
            "",
            common.table(["method", "img/s", "x plain", "each repeat", "peak RSS MB"], rows),
            "",
            common.targets_table(targets(summary)),
        ]
    )


def main(argv: list[str]) -> int:
    if common.child_main(CHILDREN, argv):
        return 0
    parser = common.model_parser(__doc__, "a smoke run: 32 px, 3 steps, one repeat", METHODS)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.steps, args.repeats = 32, 3, 1
    info = common.machine_info()
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        summary = summarise(bench(args, Path(tmp)))
    name = "train" if args.model == "resnet18" else f"train-{args.model}"  # the cost model's: train-resnet50
    common.publish(name, args, info, summary, report(summary, args, info), targets(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
