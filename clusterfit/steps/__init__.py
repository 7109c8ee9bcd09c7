"""The pipeline's steps, one module each with one public `run(cfg) -> Result`:

    pretrain  RotNet from scratch (optional): starting weights without a download
    extract   features of every image from the starting model, chunk by chunk
    cluster   k-means of the features: centroids and one pseudo-label per image (no torch)
    train     a network from scratch on the pseudo-labels
    evaluate  kNN, low-shot kNN and linear probes of both networks, and the run report

Steps import neither each other nor the command line; they meet only through artifacts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Results:
    """A step that ran more than once: per K of a sweep, and the supervised network."""

    results: list[Any]

    @property
    def skipped(self) -> bool:
        return all(r.skipped for r in self.results)
