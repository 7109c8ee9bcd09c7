"""clusterfit: ClusterFit (CVPR 2020) as resumable, object-storage-native, Kubernetes-native software.

    import clusterfit
    cfg = clusterfit.load_config("quickstart", {"CLUSTERFIT.NUM_CLUSTERS": 30})
    clusterfit.run(cfg)        # every step of PIPELINE.STEPS, skipping finished ones
    clusterfit.cluster(cfg)    # or one step: pretrain, extract, cluster, train, evaluate

The package:
    config/     the experiment's schema (pydantic) and its loading: YAML + `config.A.B=v` overrides
    storage     file:// and s3:// behind one interface, the only I/O seam
    artifacts/  the contract between steps: folder and file names, `_SUCCESS.json`, feature parts
    steps/      pretrain, extract, cluster, train, evaluate: one `run(cfg) -> Result` each
    pipeline    the steps in order (`clusterfit run`); cli: the `clusterfit` command
    data, models, weights, labels     datasets, ResNet trunks with feature taps, WEIGHTS_INIT, pseudo-labels
    training, checkpoint, probes, linear_eval, report, kmeans, kmeans_torch    what the steps are made of
    runtime, distributed    ranks from env://, logging, progress; torch.distributed set-up
    kube/       PyTorchJob manifests, the controller, submit/status/logs/cancel/render (no torch)

Importing this package loads no torch: the controller and cluster images have none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"  # before the imports below: artifacts read it while the package loads

from clusterfit.config import Config, ConfigError, load_config
from clusterfit.errors import UserError

if TYPE_CHECKING:
    from clusterfit.pipeline import PipelineResult
    from clusterfit.results import Results
    from clusterfit.steps.cluster import ClusterResult
    from clusterfit.steps.evaluate import EvalResult
    from clusterfit.steps.extract import ExtractResult
    from clusterfit.training import FitResult

__all__ = [
    "Config",
    "ConfigError",
    "UserError",
    "__version__",
    "cluster",
    "evaluate",
    "extract",
    "load_config",
    "pretrain",
    "run",
    "train",
]


def run(cfg: Config) -> PipelineResult:
    """Every step of PIPELINE.STEPS in order, each skipped when already published with this config."""
    from clusterfit.pipeline import run_pipeline

    return run_pipeline(cfg)


def pretrain(cfg: Config) -> FitResult:
    """RotNet from scratch: `pretrain/final.pt`, the starting weights when none are given."""
    from clusterfit.steps import pretrain

    return pretrain.run(cfg)


def extract(cfg: Config) -> ExtractResult:
    """Features of every image from the starting model: `features/<split>/<layer>/`."""
    from clusterfit.steps import extract

    return extract.run(cfg)


def cluster(cfg: Config) -> ClusterResult | Results:
    """k-means of the features: `clusters/<layer>-k<K>/` (centroids, labels in dataset order, stats); one
    result per K of a sweep."""
    from clusterfit.steps import cluster

    return cluster.run(cfg)


def train(cfg: Config) -> FitResult | Results:
    """A network from scratch on the cluster labels: `train/final.pt` (`train-k<K>/` per K of a sweep; the
    supervised upper bound in `supervised/`); one result per network when there are several."""
    from clusterfit.steps import train

    return train.run(cfg)


def evaluate(cfg: Config) -> EvalResult:
    """kNN, low-shot kNN and linear probes of both networks: `eval/metrics.json` and the report."""
    from clusterfit.steps import evaluate

    return evaluate.run(cfg)
