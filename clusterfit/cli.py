"""The `clusterfit` command line.

    clusterfit run config=quickstart                      # every step, skipping finished ones
    clusterfit run config=quickstart --wait               # after the run that holds the experiment now
    clusterfit extract config=quickstart config.EXTRACT.CHUNK_SIZE=256
    clusterfit config show config=quickstart config.CLUSTERFIT.NUM_CLUSTERS=10
    clusterfit launch extract config=quickstart config.DISTRIBUTED.NUM_PROC_PER_NODE=2
    clusterfit render config=quickstart --out k8s/quickstart
    clusterfit submit config=quickstart

Arguments follow VISSL: `config=<name or path>` and any number of `config.A.B=value`.
Errors in the user's input (config, data, weights, storage) print one clear message and exit 2;
so does finding the experiment held by another run (clusterfit/lease.py).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys

from clusterfit import __version__
from clusterfit.artifacts.layout import LEASE
from clusterfit.config import STEPS, Config, ConfigError, config_from_args, to_yaml
from clusterfit.errors import UserError
from clusterfit.lease import Lease, hold_root
from clusterfit.pipeline import run_pipeline, run_step
from clusterfit.runtime import Interrupted, ranks_from_env, setup_logging
from clusterfit.storage import open_store

log = logging.getLogger("clusterfit")

STEP_HELP = {
    "pretrain": "RotNet from scratch: starting weights without any download",
    "extract": "features of every image from the starting model, chunk by chunk",
    "cluster": "k-means of the features: centroids and one pseudo-label per image",
    "train": "a network from scratch on the cluster labels",
    "evaluate": "linear probes, kNN, NMI/ARI: starting model vs. ClusterFit model",
}
# Kubernetes commands live in clusterfit.kube (no torch there); each takes the remaining argv.
KUBE_COMMANDS = {
    "render": ("clusterfit.kube.render", "cli_render", "write the step PyTorchJobs (and ConfigMap) for kubectl apply"),
    "submit": ("clusterfit.kube.commands", "cli_submit", "run the pipeline on Kubernetes, following each step's job"),
    "status": ("clusterfit.kube.commands", "cli_status", "show the experiment's step jobs and their conditions"),
    "logs": ("clusterfit.kube.commands", "cli_logs", "print (or --follow) a step's master pod log"),
    "cancel": ("clusterfit.kube.commands", "cli_cancel", "delete (or --suspend) the experiment's running step jobs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterfit",
        description="ClusterFit: extract features, k-means them into pseudo-labels, retrain, evaluate.",
        epilog="Arguments: config=<name or path> and config.KEY.PATH=value overrides, as in VISSL.",
    )
    parser.add_argument("--version", action="version", version=f"clusterfit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="every step of PIPELINE.STEPS in order, skipping finished ones")
    run.add_argument("args", nargs="*")
    add_lease_flags(run)
    for step in STEPS:
        step_parser = sub.add_parser(step, help=STEP_HELP[step])
        step_parser.add_argument("args", nargs="*")
        add_lease_flags(step_parser)
    launch = sub.add_parser("launch", help="start a step on NUM_PROC_PER_NODE local workers through torchrun")
    launch.add_argument("step", choices=[*STEPS, "run"])
    launch.add_argument("args", nargs="*")
    add_lease_flags(launch)
    config = sub.add_parser("config", help="show the resolved config")
    config.add_argument("action", choices=["show", "schema"])
    config.add_argument("args", nargs="*")
    for name, (_, _, text) in KUBE_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; parsed by its own module
    return parser


def add_lease_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait",
        action="store_true",
        help=f"when another run holds the experiment (<ROOT>/{LEASE}), wait until it ends instead of refusing",
    )
    parser.add_argument(
        "--no-lease",
        action="store_true",
        help="take no lease of the experiment root: for the step pods of `clusterfit submit`, whose controller holds "
        "the experiment",
    )


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The flags may stand anywhere among the config arguments, whose order is kept (a later override wins)."""
    ns, rest = parser.parse_known_args(argv)
    unknown = [arg for arg in rest if arg.startswith("-")]
    if unknown or not hasattr(ns, "args"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or rest)}")
    ns.args = [*ns.args, *rest]
    return ns


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if argv and argv[0] in KUBE_COMMANDS:
        # These parse their own flags (which may come before config=...): hand over the rest untouched.
        ns = argparse.Namespace(command=argv[0], args=argv[1:])
    else:
        ns = parse(build_parser(), argv)
    try:
        return dispatch(ns)
    except Interrupted as exc:
        print(f"clusterfit: {exc}", file=sys.stderr)
        return 143
    except UserError as exc:
        print(f"clusterfit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clusterfit: interrupted", file=sys.stderr)
        return 130


def dispatch(ns: argparse.Namespace) -> int:
    if ns.command in KUBE_COMMANDS:
        module, func, _ = KUBE_COMMANDS[ns.command]
        return int(getattr(importlib.import_module(module), func)(ns.args))
    if ns.command == "config":
        if ns.action == "schema":
            print(json.dumps(Config.model_json_schema(), indent=2))
            return 0
        print(to_yaml(config_from_args(ns.args)), end="")
        return 0
    cfg = config_from_args(ns.args)
    flags = ["--wait"] * ns.wait + ["--no-lease"] * ns.no_lease
    if ns.command == "launch":
        return launch(ns.step, [*flags, *ns.args], cfg)
    if cfg.DISTRIBUTED.NUM_PROC_PER_NODE > 1 and "RANK" not in os.environ:
        return launch(ns.command, [*flags, *ns.args], cfg)
    if ns.command != "run" and cfg.EXPERIMENT.SEEDS:
        raise ConfigError(
            f"EXPERIMENT.SEEDS={cfg.EXPERIMENT.SEEDS}: `clusterfit run` runs the steps once per seed; to run one step "
            f"of one seed, add config.EXPERIMENT.SEEDS=[] config.EXPERIMENT.SEED=<seed> "
            f"config.EXPERIMENT.ROOT={cfg.EXPERIMENT.root_uri}/seed-<seed>"
        )
    with experiment_lease(cfg, ns) as lease:
        if ns.command == "run":
            run_pipeline(cfg, lease)
            return 0
        result = run_step(ns.command, cfg)
    log.info("%s: %s", ns.command, result)
    return 0


def experiment_lease(cfg: Config, ns: argparse.Namespace) -> contextlib.AbstractContextManager[Lease | None]:
    """The experiment root's lease for this command (clusterfit/lease.py). One per run: rank 0 holds it, the
    other ranks never touch it (their writes stop with the run when rank 0 stops); none with --no-lease."""
    if ns.no_lease or not ranks_from_env().is_main:
        return contextlib.nullcontext()
    store = open_store(cfg.EXPERIMENT.root_uri, cfg.STORAGE)
    return hold_root(store, wait=ns.wait, ttl_s=cfg.PIPELINE.LEASE_TTL_S)


def launch(step: str, args: list[str], cfg: Config) -> int:
    """Hand the step to torch.distributed.run with NUM_PROC_PER_NODE local workers (torchrun owns the ranks;
    rank 0 takes the experiment's lease)."""
    import subprocess

    nproc = cfg.DISTRIBUTED.NUM_PROC_PER_NODE
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command = [*torchrun, "-m", "clusterfit", step, *args]
    log.info("launch: %s", " ".join(command))
    return subprocess.call(command)


__all__ = ["main", "to_yaml"]
