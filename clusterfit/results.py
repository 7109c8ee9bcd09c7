"""What a step returns when it ran more than once in one call: per K of a sweep, and the supervised network.

Here, not in `clusterfit.steps`, because steps import neither each other nor their package (DESIGN.md,
"Import boundaries"); no deep-learning library, as the cluster image has no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Results:
    """One result per run of the step, in the order they ran."""

    results: list[Any]

    @property
    def skipped(self) -> bool:
        return all(r.skipped for r in self.results)


def one_or_all(results: list[Any]) -> Any:
    """A step's return value: its one result as it is, several as `Results`."""
    return results[0] if len(results) == 1 else Results(results)
