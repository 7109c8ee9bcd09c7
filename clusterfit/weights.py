"""`MODEL.WEIGHTS_INIT`: load a checkpoint into a Network the way VISSL's documentation says.

Order of operations, as VISSL documents them: pick the state dict at STATE_DICT_KEY_NAME (dots
for nesting; "" for a flat file), flatten nested dicts, drop keys containing any SKIP_LAYERS
substring, remove REMOVE_PREFIX, then add APPEND_PREFIX. VISSL's own checkpoints hold the model
under `classy_state_dict.base_model.model`, and its linear-evaluation wrapper names the trunk
`trunk.base_model._feature_blocks`; both map onto our `trunk._feature_blocks` names.

A trunk parameter left missing is an error (a silently random trunk is the worst outcome); a
shape mismatch is an error naming the key and both shapes.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clusterfit.artifacts.lineage import StartWeights
from clusterfit.config import Config, StorageConfig, WeightsInitConfig
from clusterfit.errors import UserError
from clusterfit.models import Network, build_network
from clusterfit.storage import read_uri

log = logging.getLogger(__name__)

_ALIASES = (("base_model.model.", ""), ("trunk.base_model._feature_blocks.", "trunk._feature_blocks."))


class WeightsError(UserError, ValueError):
    """A checkpoint that does not fit the model; the message names the file and the key."""


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")

        return (
            f"{self.source}: loaded {len(self.loaded)} tensors; missing {len(self.missing)}"
            f"{' [' + some(self.missing) + ']' if self.missing else ''}; unexpected {len(self.unexpected)}"
            f"{' [' + some(self.unexpected) + ']' if self.unexpected else ''}; skipped {len(self.skipped)}"
        )


def read_checkpoint(uri: str, storage: StorageConfig | None = None) -> Any:
    """torch.load of a local or s3:// file, tensors on the CPU; safe unpickling first."""
    data = read_uri(uri, storage)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("%s holds more than tensors; loading it with full unpickling (trust the file)", uri)
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise WeightsError(f"{uri}: cannot load checkpoint: {exc}") from exc
    except Exception as exc:
        raise WeightsError(f"{uri}: cannot load checkpoint: {exc}") from exc


def select_state_dict(checkpoint: Any, key_name: str, source: str) -> dict[str, torch.Tensor]:
    """The flat {name: tensor} dict under `key_name` (dotted for nesting; "" for the whole file)."""
    node = checkpoint
    if key_name:
        for part in key_name.split("."):
            if not isinstance(node, dict) or part not in node:
                keys = sorted(node)[:10] if isinstance(node, dict) else type(node).__name__
                raise WeightsError(
                    f"{source}: MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={key_name!r}: key {part!r} not found "
                    f'(available: {keys}); use "" if the file is a plain state dict'
                )
            node = node[part]
    if not isinstance(node, dict):
        raise WeightsError(f"{source}: the state dict at {key_name!r} is a {type(node).__name__}, not a dict")
    return flatten(node)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
    return flat


def rename_keys(state: dict[str, torch.Tensor], cfg: WeightsInitConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """SKIP_LAYERS, then REMOVE_PREFIX, then APPEND_PREFIX, then VISSL's layout aliases."""
    renamed: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        if skipped_by(key, cfg.SKIP_LAYERS):
            skipped.append(key)
            continue
        if cfg.REMOVE_PREFIX and key.startswith(cfg.REMOVE_PREFIX):
            key = key[len(cfg.REMOVE_PREFIX) :]
        key = cfg.APPEND_PREFIX + key
        for old, new in _ALIASES:
            if key.startswith(old):
                key = new + key[len(old) :]
        renamed[key] = value
    return renamed, skipped


def load_weights(
    model: nn.Module, cfg: WeightsInitConfig, storage: StorageConfig | None = None, *, require_trunk: bool = True
) -> LoadReport:
    """Load `cfg.PARAMS_FILE` into `model`; raise on missing trunk keys and shape mismatches."""
    source = cfg.PARAMS_FILE
    state = select_state_dict(read_checkpoint(source, storage), cfg.STATE_DICT_KEY_NAME, source)
    renamed, skipped = rename_keys(state, cfg)
    report = LoadReport(source=source, skipped=skipped)
    expected = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    for key, value in renamed.items():
        if key not in expected:
            report.unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise WeightsError(
                f"{source}: shape mismatch for {key}: checkpoint {tuple(value.shape)} vs model "
                f"{tuple(expected[key].shape)} "
                "(is MODEL.TRUNK.NAME / SMALL_IMAGE_STEM the architecture the checkpoint was trained with?)"
            )
        usable[key] = value
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in expected if k not in usable and not skipped_by(k, cfg.SKIP_LAYERS))
    trunk_missing = [k for k in report.missing if k.startswith("trunk.")]
    if require_trunk and trunk_missing:
        sample = ", ".join(trunk_missing[:3])
        hint = ""
        if report.unexpected:
            hint = f"; the checkpoint has e.g. {report.unexpected[0]!r}: check REMOVE_PREFIX/APPEND_PREFIX"
        raise WeightsError(
            f"{source}: {len(trunk_missing)} trunk parameters not found in the checkpoint (e.g. {sample}){hint}. "
            "Refusing to run with a partly random trunk."
        )
    model.load_state_dict(usable, strict=False)
    log.info("weights: %s", report.summary())
    return report


def skipped_by(key: str, patterns: list[str]) -> bool:
    """Whether SKIP_LAYERS keeps `key` out: it contains one of the (non-empty) patterns."""
    return any(pattern and pattern in key for pattern in patterns)


def starting_model(cfg: Config, start: StartWeights) -> Network:
    """The network extraction starts from: MODEL.TRUNK with the start weights loaded (random when there are none)."""
    torch.manual_seed(cfg.EXPERIMENT.SEED)
    model = build_network(cfg.MODEL.TRUNK)
    if start.random:
        log.warning(
            "no MODEL.WEIGHTS_INIT.PARAMS_FILE and no pretrain step: extracting features of a RANDOMLY INITIALISED %s",
            cfg.MODEL.TRUNK.NAME,
        )
        return model
    assert start.options is not None
    load_weights(model, start.options.model_copy(update={"PARAMS_FILE": start.uri}), cfg.STORAGE, require_trunk=True)
    return model
