"""Loading the experiment config: a YAML file deep-merged with overrides, then one validation.

    cfg = load_config("quickstart", {"CLUSTERFIT.NUM_CLUSTERS": 30})        # from Python
    cfg = config_from_args(["config=quickstart", "config.CLUSTERFIT.NUM_CLUSTERS=30"])   # VISSL's CLI form

`config=<name>` is looked up in $CLUSTERFIT_CONFIG_DIR, ./configs and the package's configs. Errors
name the key (and the closest valid one) or the file. No deep-learning library is imported here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

from clusterfit.config.schema import Config, canonical_tree
from clusterfit.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used; the message names the key or file."""


def config_dirs() -> list[Path]:
    """Folders that `config=<name>` is looked up in, first match wins."""
    dirs = [Path.cwd() / "configs"]
    if env := os.environ.get("CLUSTERFIT_CONFIG_DIR"):
        dirs.insert(0, Path(env))
    dirs.append(Path(__file__).resolve().parents[2] / "configs")  # the repository's configs/
    return list(dict.fromkeys(d.resolve() for d in dirs))


def resolve_config_path(name: str) -> Path:
    """`quickstart`, `pretrain/clusterfit/x`, `x.yaml` or a path -> the YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return candidate
    for folder in config_dirs():
        for suffix in ("", ".yaml", ".yml"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    searched = ", ".join(str(d) for d in config_dirs())
    raise ConfigError(f"config={name}: no such config file (looked for {name}[.yaml] in {searched})")


def parse_overrides(args: list[str]) -> tuple[str | None, dict[str, Any]]:
    """Split `config=<name>` and `config.A.B=value` arguments; values are parsed as YAML scalars/lists."""
    name: str | None = None
    overrides: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r}: expected config=<name> or config.KEY.PATH=value")
        if key == "config":
            quoted = unquote(raw, key)
            name = raw if quoted is None else quoted
            continue
        if not key.startswith("config.") or len(key) <= len("config."):
            raise ConfigError(f"argument {arg!r}: overrides are written config.KEY.PATH=value")
        path = key[len("config.") :].split(".")
        if "" in path:
            raise ConfigError(f"argument {arg!r}: {key!r} has an empty key between its dots")
        _set_path(overrides, path, parse_value(raw, field_annotation(path), key))
    return name, overrides


def field_annotation(path: list[str]) -> Any:
    """The type annotation of the config field at `path`, or None when there is no such field."""
    model: Any = Config
    annotation: Any = None
    for part in path:
        fields = getattr(model, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        model = annotation
    return annotation


def parse_value(raw: str, annotation: Any, key: str) -> Any:
    """A command-line value: a quoted value is the text inside the quotes, as VISSL's (Hydra's) parser
    reads it; anything else is YAML, except that text fields keep the text as typed (NAME=2024 stays
    "2024"). A field that takes text or a list of text (STATE_DICT_KEY_NAME) gets a list only for [..]."""
    quoted = unquote(raw, key)
    if quoted is not None:
        return quoted
    if annotation is str:
        return raw
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {exc}") from exc
    text_or_list = {str, list[str]} <= set(get_args(annotation))
    if (annotation == list[str] or text_or_list) and isinstance(value, list):
        return [v if isinstance(v, str) else raw_item(v) for v in value]
    if text_or_list and not isinstance(value, dict):
        return raw
    return value


# One quoted string: an opening quote, then characters or backslash escapes, then the same quote.
_QUOTED = {q: re.compile(rf"{q}((?:[^{q}\\]|\\.)*){q}", re.DOTALL) for q in ("'", '"')}
_ESCAPES = {q: re.compile(rf"(\\+)({q}|$)") for q in ("'", '"')}


def unquote(raw: str, key: str) -> str | None:
    """The text inside a quoted value (`"a b"`, `'x'`), or None when `raw` is not quoted. As in Hydra's
    override grammar, a run of backslashes before a quote (or before the closing quote) is halved and
    an odd one keeps the quote; other backslashes are kept. A value that opens a quote it never closes
    (`"trunk.`) or that continues after it (`"a"b`) is an error, not a literal with quotes in it."""
    if not raw or raw[0] not in _QUOTED:
        return None
    quote = raw[0]
    match = _QUOTED[quote].fullmatch(raw)
    if match is None:
        raise ConfigError(
            f"{key}: value {raw!r} opens a {quote} quotation it does not close at the end; quote the whole value "
            f"(escape a {quote} inside it as \\{quote}) or leave the quotes out"
        )
    return _ESCAPES[quote].sub(lambda m: "\\" * (len(m[1]) // 2) + m[2], match[1])


def raw_item(value: Any) -> str:
    return "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config.{'.'.join(path)}: {part} is a value, not a section")
        tree = node
    tree[path[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """A new dict: `extra` merged into `base`; nested dicts merge, everything else is replaced."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    # VISSL configs nest everything under `config:`; accept both layouts.
    if set(data) == {"config"} and isinstance(data["config"], dict):
        data = data["config"]
    return data


def load_config(name_or_path: str | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """The validated config: the YAML file `name_or_path` (a name under configs/ or a path; None for
    the defaults) with `overrides` merged in. Override keys are dotted paths (`"CLUSTERFIT.N_ITER"`)
    or sections (`"CLUSTERFIT"` with a dict, merged); values are taken as given."""
    tree: dict[str, Any] = canonical_tree(read_yaml(resolve_config_path(name_or_path))) if name_or_path else {}
    for key, value in (overrides or {}).items():
        tree = deep_merge(tree, canonical_tree(nested({}, key.split("."), value)))
    return validate(tree, source=name_or_path or "<defaults>")


def config_from_args(args: Sequence[str]) -> Config:
    """The validated config from command-line arguments: `config=<name or path>` and any number of
    `config.A.B=value` (values parsed as YAML, text fields kept as typed), as VISSL takes them."""
    name, overrides = parse_overrides(list(args))
    tree: dict[str, Any] = canonical_tree(read_yaml(resolve_config_path(name))) if name else {}
    return validate(deep_merge(tree, canonical_tree(overrides)), source=name or "<defaults>")


def nested(tree: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """`tree` with `value` set at `path` (sections created as needed)."""
    _set_path(tree, path, value)
    return tree


def validate(tree: dict[str, Any], source: str = "<config>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{source}: invalid config:\n" + "\n".join(_describe(err) for err in exc.errors())) from None


def _describe(err: Any) -> str:
    loc = [str(part) for part in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        hint = closest_key(loc)
        return f"  {key}: unknown key" + (f" (did you mean {hint}?)" if hint else "")
    value = err.get("input")
    shown = f" (got {value!r})" if not isinstance(value, dict) else ""
    return f"  {key or '<top level>'}: {err['msg']}{shown}"


def closest_key(loc: list[str]) -> str | None:
    """The valid dotted key nearest to an unknown one, at the same level."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    matches = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.5)
    if not matches:
        matches = [k for k in model.model_fields if k.lower() == loc[-1].lower()]
    return ".".join([*loc[:-1], matches[0]]) if matches else None


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
