"""The run report's HTML as a browser shows it (report.to_html; the whole report: tests/test_pipeline.py)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from clusterfit.report import gap_phrase, to_html
from tests.browser import view


def png(color: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_load_and_tables_render_whatever_the_alt_text_holds(tmp_path: Path) -> None:
    # The hand-written converter this replaced cut the first image's src at the "(" of its alt text.
    text = "\n".join(
        [
            "# ClusterFit report: <exp> & co",
            "",
            "- res5avg kNN top-1: ClusterFit 98.61% vs. start 96.11% (+2.50 points; McNemar mid-p 0.013): **better**",
            "",
            "| model | layer | kNN top-1 (%) |",
            "| --- | --- | ---: |",
            "| start | res5avg | 96.11 |",
            "| clusterfit | res5avg | 98.61 |",
            "",
            "## Example images per cluster (nearest to the centroid first)",
            "",
            "![Example images per cluster (nearest to the centroid first)](cluster_examples.png)",
            "",
            "![Cluster sizes [K=100]](cluster_sizes.png)",
        ]
    )
    (tmp_path / "cluster_examples.png").write_bytes(png("red"))
    (tmp_path / "cluster_sizes.png").write_bytes(png("blue"))
    (tmp_path / "report.html").write_text(to_html(text, "ClusterFit report: <exp>"))
    page = view(tmp_path / "report.html")
    assert [src for src, _, _ in page.images] == ["cluster_examples.png", "cluster_sizes.png"]
    assert page.broken_images == []
    assert page.tables == [
        [["model", "layer", "kNN top-1 (%)"], ["start", "res5avg", "96.11"], ["clusterfit", "res5avg", "98.61"]]
    ]
    assert page.headings[0] == "ClusterFit report: <exp> & co"


def test_a_missing_image_is_seen_as_broken(tmp_path: Path) -> None:
    # The check above must be able to fail: an image file that is not there does not decode.
    (tmp_path / "report.html").write_text(to_html("![Cluster sizes](cluster_sizes.png)", "r"))
    assert view(tmp_path / "report.html").broken_images == ["cluster_sizes.png"]


def test_the_share_of_the_gap_to_supervised_reads_as_words_past_either_end() -> None:
    # Fashion-MNIST seed 0: supervised kNN only 0.2 points above the start, ClusterFit 1.2 above it (600 %).
    assert gap_phrase(0.69, "75.11%") == "; closes 69% of the gap to supervised 75.11%"
    assert gap_phrase(6.0, "78.40%") == "; above supervised 78.40%"
    assert gap_phrase(-0.3, "80.00%") == "; supervised 80.00%"
