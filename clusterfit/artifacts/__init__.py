"""The artifact contract between steps: where each file lives (`layout`), the `_SUCCESS.json`
manifest that publishes a folder (`manifest`), reading extracted features (`features`), and where
the starting weights come from (`lineage`). No deep-learning import: the cluster image has no torch.

    from clusterfit import artifacts
    ledger = artifacts.Ledger(store, "clusters/res5-k100")
    ledger.put_array("labels.npy", labels)
    artifacts.publish(ledger, step="cluster", config=..., inputs=..., fingerprint_=fp, started_s=t0)
"""

from clusterfit.artifacts.layout import MANIFEST
from clusterfit.artifacts.manifest import (
    ArtifactError,
    Ledger,
    fingerprint,
    is_published,
    load_array,
    load_bytes,
    load_json,
    publish,
    read_manifest,
    skip_if_published,
)
from clusterfit.storage import sha256_bytes

__all__ = [
    "MANIFEST",
    "ArtifactError",
    "Ledger",
    "fingerprint",
    "is_published",
    "load_array",
    "load_bytes",
    "load_json",
    "publish",
    "read_manifest",
    "sha256_bytes",
    "skip_if_published",
]
