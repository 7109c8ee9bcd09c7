"""`MODEL.WEIGHTS_INIT`: load a checkpoint into a Network the way VISSL's loader does
(vissl/utils/checkpoint.py, init_model_from_consolidated_weights).

STATE_DICT_KEY_NAME picks the state dict: VISSL's list of nested keys, or our string (dots for
nesting unless the whole string is a key; "" for a flat file). Exactly "classy_state_dict" means a
VISSL-written file: its `base_model.model.{trunk,heads}` names are mapped onto the model's
(clusterfit.checkpoint.model_state) and REMOVE_PREFIX/APPEND_PREFIX are ignored, as VISSL ignores
them there. Any other key: nested dicts are flattened, REMOVE_PREFIX removed, APPEND_PREFIX added,
then VISSL's layout aliases applied (`base_model.model.`, `trunk.base_model._feature_blocks.`).
SKIP_LAYERS is matched against the resulting model name, as VISSL does, and against the key as
the file spells it.

A trunk parameter left missing is an error (a silently random trunk is the worst outcome); a
shape mismatch is an error naming the key and both shapes.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from clusterfit.artifacts.lineage import StartWeights
from clusterfit.checkpoint import model_state
from clusterfit.config import Config, StorageConfig, WeightsInitConfig
from clusterfit.errors import UserError
from clusterfit.models import Network, build_network
from clusterfit.storage import read_uri

log = logging.getLogger(__name__)

_ALIASES = (("base_model.model.", ""), ("trunk.base_model._feature_blocks.", "trunk._feature_blocks."))
VISSL_KEY = "classy_state_dict"  # the one STATE_DICT_KEY_NAME that means VISSL's layout


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


def key_path(key_name: str | list[str], checkpoint: Any) -> list[str]:
    """STATE_DICT_KEY_NAME as nested keys: VISSL's list as it is; a string that is itself a key of the
    file as that key (VISSL's meaning); else the string split at its dots."""
    if isinstance(key_name, list):
        return list(key_name)
    if not key_name:
        return []
    if isinstance(checkpoint, dict) and key_name in checkpoint:
        return [key_name]
    return key_name.split(".")


def select_state_dict(checkpoint: Any, key_name: str | list[str], source: str) -> dict[str, Any]:
    """The (possibly nested) dict at STATE_DICT_KEY_NAME; the whole file for ""."""
    node = checkpoint
    for part in key_path(key_name, checkpoint):
        if not isinstance(node, dict) or part not in node:
            keys = sorted(node)[:10] if isinstance(node, dict) else type(node).__name__
            raise WeightsError(
                f"{source}: MODEL.WEIGHTS_INIT.STATE_DICT_KEY_NAME={key_name!r}: key {part!r} not found "
                f'(available: {keys}); use "" if the file is a plain state dict'
            )
        node = node[part]
    if not isinstance(node, dict):
        raise WeightsError(f"{source}: the state dict at {key_name!r} is a {type(node).__name__}, not a dict")
    return node


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """{dotted name: tensor} of a nested dict; numpy arrays (old VISSL model-zoo files) become tensors."""
    flat: dict[str, torch.Tensor] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            flat[name] = value
        elif isinstance(value, np.ndarray):
            flat[name] = torch.from_numpy(value)
    return flat


def model_names(checkpoint: Any, cfg: WeightsInitConfig, source: str) -> list[tuple[str, str, torch.Tensor]]:
    """(name in the file, name in the model, tensor) for every tensor of the selected state dict."""
    state = select_state_dict(checkpoint, cfg.STATE_DICT_KEY_NAME, source)
    if cfg.STATE_DICT_KEY_NAME == VISSL_KEY:
        if cfg.REMOVE_PREFIX or cfg.APPEND_PREFIX:
            log.warning(
                "%s: REMOVE_PREFIX=%r and APPEND_PREFIX=%r are ignored with STATE_DICT_KEY_NAME=%s, as in VISSL "
                "(write the key as the list [%s] to apply them)",
                source,
                cfg.REMOVE_PREFIX,
                cfg.APPEND_PREFIX,
                VISSL_KEY,
                VISSL_KEY,
            )
        return [(name, name, value) for name, value in flatten(model_state(state)).items()]
    names = []
    for key, value in flatten(state).items():
        name = key.removeprefix(cfg.REMOVE_PREFIX) if cfg.REMOVE_PREFIX else key
        name = cfg.APPEND_PREFIX + name
        for old, new in _ALIASES:
            if name.startswith(old):
                name = new + name[len(old) :]
        names.append((key, name, value))
    return names


def load_weights(
    model: nn.Module, cfg: WeightsInitConfig, storage: StorageConfig | None = None, *, require_trunk: bool = True
) -> LoadReport:
    """Load `cfg.PARAMS_FILE` into `model`; raise on missing trunk keys and shape mismatches."""
    source = cfg.PARAMS_FILE
    expected = model.state_dict()
    report = LoadReport(source=source)
    usable: dict[str, torch.Tensor] = {}
    for key, name, value in model_names(read_checkpoint(source, storage), cfg, source):
        if skipped_by(name, cfg.SKIP_LAYERS) or skipped_by(key, cfg.SKIP_LAYERS):
            report.skipped.append(name)
            continue
        if name not in expected:
            report.unexpected.append(name)
            continue
        if tuple(value.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{source}: shape mismatch for {name}: checkpoint {tuple(value.shape)} vs model "
                f"{tuple(expected[name].shape)} "
                "(is MODEL.TRUNK.NAME / SMALL_IMAGE_STEM the architecture the checkpoint was trained with?)"
            )
        usable[name] = value
    report.loaded = sorted(usable)
    # Skipped on purpose (by its name in the file or in the model) is not missing.
    left_out = set(report.skipped)
    report.missing = sorted(
        k for k in expected if k not in usable and k not in left_out and not skipped_by(k, cfg.SKIP_LAYERS)
    )
    trunk_missing = [k for k in report.missing if k.startswith("trunk.")]
    if require_trunk and trunk_missing:
        sample = ", ".join(trunk_missing[:3])
        raise WeightsError(
            f"{source}: {len(trunk_missing)} trunk parameters not found in the checkpoint (e.g. {sample})"
            f"{naming_hint(report, cfg)}. Refusing to run with a partly random trunk."
        )
    model.load_state_dict(usable, strict=False)
    log.info("weights: %s", report.summary())
    return report


def naming_hint(report: LoadReport, cfg: WeightsInitConfig) -> str:
    """What to change when the file's names miss the model's, shown with one of the file's names."""
    if not report.unexpected:
        return ""
    example = f"; the checkpoint has e.g. {report.unexpected[0]!r}"
    if cfg.STATE_DICT_KEY_NAME == VISSL_KEY:
        return (
            f"{example}. STATE_DICT_KEY_NAME={VISSL_KEY} reads VISSL's layout and ignores REMOVE_PREFIX/APPEND_PREFIX "
            f"(as VISSL does); for another layout name the nested keys, e.g. STATE_DICT_KEY_NAME=[{VISSL_KEY}], and "
            "set the prefixes"
        )
    return f"{example}: check REMOVE_PREFIX/APPEND_PREFIX"


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
