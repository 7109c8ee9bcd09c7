"""Generated overrides, YAML documents and manifests: a result, or a UserError that names the key or the file;
never a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterfit.artifacts.manifest import ArtifactError, load_bytes, read_manifest
from clusterfit.config import Config, config_from_args
from clusterfit.config.loading import ConfigError, read_yaml, validate
from clusterfit.config.schema import canonical_tree
from clusterfit.errors import UserError
from clusterfit.storage import open_store


def schema_paths(model: Any = Config, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field's dotted path in the schema (sections and leaves)."""
    paths = []
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        paths.append(path)
        if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
            paths += schema_paths(field.annotation, path)
    return paths


PATHS = schema_paths()
NAMES = sorted({part for path in PATHS for part in path})
SETTINGS = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text that command lines and YAML make hard: quotes, brackets, colons, escapes, unicode, control bytes.
tricky = st.text(alphabet=st.sampled_from(list("aZ0 .-_:,'\"[]{}#&*!|>%@`\\\n\t=é\u2028")), max_size=12)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    tricky,
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky, inner, max_size=3), max_leaves=6
)
keys = st.one_of(
    st.sampled_from(PATHS).map(".".join),
    st.lists(st.sampled_from(NAMES) | tricky, min_size=1, max_size=4).map(".".join).filter(lambda k: "=" not in k),
)  # the first '=' ends the key, as on a command line


def names_the_key(message: str, key: str) -> bool:
    """The error names the key (or, for a section given as a value or a bad value inside it, a part of it)."""
    return any(part and part in message for part in [key, *key.split(".")])


@SETTINGS
@given(items=st.lists(st.tuples(keys, tricky | scalars.map(str)), min_size=1, max_size=3))
def test_generated_overrides_give_a_config_or_an_error_naming_the_key(items: list[tuple[str, str]]) -> None:
    args = [f"config.{key}={raw}" for key, raw in items]
    try:
        config_from_args(args)
    except ConfigError as exc:
        named = [
            names_the_key(str(exc), key) or repr(arg) in str(exc) for arg, (key, _) in zip(args, items, strict=True)
        ]
        assert any(named), (args, str(exc))


@SETTINGS
@given(tree=st.dictionaries(st.sampled_from(NAMES) | tricky, values, max_size=4))
def test_generated_yaml_documents_give_a_config_or_an_error_naming_the_key(
    tree: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("yaml") / "exp.yaml"
    path.write_text(yaml.safe_dump(tree, allow_unicode=True))
    try:
        validate(canonical_tree(read_yaml(path)), source=str(path))
    except ConfigError as exc:
        assert str(path) in str(exc), str(exc)


@SETTINGS
@given(data=st.text(max_size=200).map(str.encode) | st.binary(max_size=200))
def test_any_bytes_as_a_config_file_give_a_config_or_an_error_naming_the_file(
    data: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path: Path = tmp_path_factory.mktemp("yaml") / "exp.yaml"
    path.write_bytes(data)
    try:
        validate(canonical_tree(read_yaml(path)), source=str(path))
    except ConfigError as exc:
        assert str(path) in str(exc), str(exc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | tricky,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(tricky | st.sampled_from(["files", "size", "sha256"]), inner, max_size=4)
    ),
    max_leaves=10,
)
manifests = st.one_of(
    st.binary(max_size=100),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(tricky, st.dictionaries(st.sampled_from(["size", "sha256", "shape"]), json_values), max_size=3).map(
        lambda files: json.dumps({"fingerprint": "x", "files": files}).encode()
    ),
)


@SETTINGS
@given(data=manifests)
def test_any_manifest_bytes_read_or_fail_naming_the_manifest(
    data: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("exp")
    (root / "features").mkdir()
    (root / "features" / "_SUCCESS.json").write_bytes(data)
    store = open_store(root.as_uri())
    try:
        manifest = read_manifest(store, "features")
    except ArtifactError as exc:
        assert "features/_SUCCESS.json" in str(exc), str(exc)
        return
    for name in [*manifest.get("files", {}), "absent.npy"]:
        with pytest.raises(UserError):  # nothing of these is on disk: a named error, never a KeyError
            load_bytes(store, "features", name, manifest)
