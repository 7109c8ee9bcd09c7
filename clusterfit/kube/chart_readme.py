"""The values table of helm/clusterfit/README.md, generated from values.yaml's comments.

    python -m clusterfit.kube.chart_readme      # rewrites the table between the markers

Each key's description is the comment block right above it plus its trailing comment. Every key
outside `experiment` must have one (`experiment` is the config: `clusterfit config schema`
documents it; its commented keys are listed too). tests/kube/test_chart_values.py fails when the
committed README differs from what this module writes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

VALUES_PATH = "helm/clusterfit/values.yaml"
README_PATH = "helm/clusterfit/README.md"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_.-]*):(?P<rest>.*)$")
MAX_DEFAULT = 60  # longer defaults read better in values.yaml itself


def documented_keys(text: str) -> list[tuple[str, str, bool]]:
    """(dotted path, description, is_leaf) of each key line of values.yaml, in file order."""
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    comment: list[str] = []
    out: list[tuple[str, str, bool]] = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("#"):
            comment.append(stripped.lstrip("#").strip())
            continue
        match = KEY_LINE.match(line)
        if not match:
            comment = []
            continue
        indent = len(match["indent"])
        stack = [(d, k) for d, k in stack if d < indent] + [(indent, match["key"])]
        value, _, trailing = match["rest"].partition(" #")
        text_parts = [*comment, trailing.strip()]
        comment = []
        nxt = next((n for n in lines[i + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        leaf = bool(value.strip()) or len(nxt) - len(nxt.lstrip()) <= indent
        out.append((".".join(k for _, k in stack), " ".join(p for p in text_parts if p), leaf))
    return out


def _default(values: dict[str, Any], path: str) -> str:
    node: Any = values
    for key in path.split("."):
        node = node[key]
    shown = json.dumps(node, separators=(", ", ": "))
    return f"`{shown}`" if len(shown) <= MAX_DEFAULT else "see values.yaml"


def values_table(text: str) -> str:
    """The markdown table of every documented value; raises ValueError naming an undocumented one."""
    values = yaml.safe_load(text)
    rows = ["| value | default | what |", "| --- | --- | --- |"]
    for path, description, leaf in documented_keys(text):
        if not description:
            if leaf and not path.startswith("experiment."):
                raise ValueError(f"{VALUES_PATH}: {path} has no comment; document it above or beside the key")
            continue
        default = _default(values, path) if leaf else ""
        rows.append(f"| `{path}` | {default} | {description.replace('|', '/').replace('<', '&lt;')} |")
    return "\n".join(rows)


def render_readme(readme: str, values_text: str) -> str:
    """`readme` with the table between BEGIN and END replaced by the one values.yaml gives."""
    before, rest = readme.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return f"{before}{BEGIN}\n{values_table(values_text)}\n{END}{after}"


def main() -> None:
    readme = Path(README_PATH)
    readme.write_text(render_readme(readme.read_text(), Path(VALUES_PATH).read_text()))
    print(readme)


if __name__ == "__main__":
    main()
