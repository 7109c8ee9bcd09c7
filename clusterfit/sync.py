"""Coordination between ranks through the artifact store (no torch.distributed needed)."""

from __future__ import annotations

import time

from clusterfit.storage import Store


def wait_for_keys(store: Store, keys: list[str], timeout_s: float, what: str, poll_s: float = 0.5) -> None:
    """Block until every key exists; raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout_s
    pending = list(keys)
    while pending:
        pending = [key for key in pending if not store.exists(key)]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s:.0f}s for {what}: {store.uri(pending[0])} never appeared")
        time.sleep(poll_s)
