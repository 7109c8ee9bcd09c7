"""`clusterfit render`: an experiment's Kubernetes objects as YAML files for `kubectl apply -f`.

    clusterfit render config=kubernetes-example --out k8s/quickstart
    clusterfit render config=kubernetes-example config.DISTRIBUTED.NUM_NODES=2 --stdout | kubectl apply -f -

Writes 00-configmap.yaml (immutable, named <EXPERIMENT.NAME>-config-<digest of its content>, so a
render of another config applies beside it instead of changing what running pods read), then
01-<step>.yaml, 02-<step>.yaml ... in PIPELINE.STEPS order. `clusterfit submit` with the same config
adopts the jobs applied from these files. A step
refuses inputs whose _SUCCESS.json is missing, so apply the ConfigMap, then each job once the one
before it Succeeded (`kubectl wait --for=condition=Succeeded pytorchjob/<name>`), or let
`clusterfit submit` / the Helm chart's controller do exactly that.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from clusterfit.config import ConfigError, config_from_args
from clusterfit.kube.manifests import ManifestError, build_all

RENDERED = re.compile(r"^\d\d-[a-z0-9-]+\.yaml$")


class _BlockDumper(yaml.SafeDumper):
    """SafeDumper that writes multi-line strings (the ConfigMap's config.yaml) as `|` blocks."""


def _str_block(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_block)


def dump_yaml(obj: dict[str, Any]) -> str:
    """One object as YAML, keys in the order they were built."""
    return yaml.dump(obj, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)


def file_names(objects: list[dict[str, Any]]) -> list[str]:
    """00-configmap.yaml, then NN-<step>.yaml for each job."""
    names = []
    for i, obj in enumerate(objects):
        component = obj["metadata"]["labels"]["app.kubernetes.io/component"]
        names.append(f"{i:02d}-{'configmap' if obj['kind'] == 'ConfigMap' else component}.yaml")
    return names


def write_objects(objects: list[dict[str, Any]], out: Path, header: str) -> list[Path]:
    """Write one file per object into `out`, replacing earlier renders (NN-*.yaml) there."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.iterdir():
        if RENDERED.match(stale.name):
            stale.unlink()
    paths = []
    for name, obj in zip(file_names(objects), objects, strict=True):
        path = out / name
        path.write_text(header + dump_yaml(obj))
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clusterfit render",
        description="Write the experiment's ConfigMap and one PyTorchJob per step as YAML for kubectl apply.",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="folder for the files (default: k8s/rendered/<EXPERIMENT.NAME>)"
    )
    parser.add_argument("--stdout", action="store_true", help="print all objects as one multi-document YAML instead")
    parser.add_argument(
        "--config-map-name",
        default=None,
        help="name of the config ConfigMap (default: <EXPERIMENT.NAME>-config-<digest of the config>)",
    )
    parser.add_argument("args", nargs="*", help="config=<name or path> and config.KEY.PATH=value overrides")
    return parser


def cli_render(argv: list[str]) -> int:
    """Entry point of `clusterfit render`; returns the exit code (2 for a config that cannot render)."""
    ns = build_parser().parse_intermixed_args(argv)
    try:
        cfg = config_from_args(ns.args)
        objects = build_all(cfg, config_map_name=ns.config_map_name)
    except (ConfigError, ManifestError) as exc:
        print(f"clusterfit render: error: {exc}", file=sys.stderr)
        return 2
    header = (
        f"# Rendered by: clusterfit render {shlex.join(argv)}\n"
        "# Edit the config and render again rather than this file.\n"
    )
    if ns.stdout:
        sys.stdout.write(header + "---\n".join(dump_yaml(obj) for obj in objects))
        return 0
    out = ns.out if ns.out is not None else Path("k8s") / "rendered" / cfg.EXPERIMENT.NAME
    for path in write_objects(objects, out, header):
        print(path)
    return 0
