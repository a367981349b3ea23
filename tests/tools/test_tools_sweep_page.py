"""The sweep's report.html at a 1280 px window, measured in headless Chromium: the accuracy axis
zoomed to the candidates worth comparing, point labels that overlap neither each other nor a
point, and a candidates table that fits (nothing cut off, no sideways scrolling); and the sweep's
notes about its data said once."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from slimgraph.api.sweep import Candidate, CandidateResult, SweepResult, pareto_flags
from slimgraph.tools.report import _zoom, write_report
from slimgraph.tools.sweep_cmd import report_page
from tests.kit.cli import run_script
from tests.kit.data import DIGITS, DIGITS_TEST
from tests.tools.chromium import layout, overlap

# (latency ratio, accuracy, size in bytes): a sweep as users run it, with fine-tuning between
# prune and quantize: most candidates within a point of each other (several at the same
# accuracy and nearly the same latency), two whose accuracy collapsed.
FIGURES = [(1.0, 0.9956, 520_000), (0.19, 0.9956, 126_000), (0.54, 0.9933, 390_000),
           (0.25, 0.9933, 99_000), (0.23, 0.9933, 64_000), (0.5, 0.9911, 300_000),
           (0.21, 0.9911, 80_000), (0.20, 0.9956, 123_000), (0.45, 0.12, 250_000),
           (0.22, 0.10, 60_000), (0.24, 0.9900, 70_000), (0.26, 0.9922, 75_000)]


def crowded_sweep() -> SweepResult:
    results = []
    for i, (latency, accuracy, size) in enumerate(FIGURES):
        name = f"prune={i / 20:.2f} finetune.epochs=3 finetune.data=digits_train.npz quantize=int8"
        path = f"/tmp/front/{i:02d}-prune={i / 20:.2f}_finetune.epochs=3_quantize=int8.onnx"
        results.append(CandidateResult(Candidate(i, name, {}, ()), latency_ratio=latency,
                                       metric=accuracy, size_bytes=size, macs=1_672_704,
                                       latency_interval=(0.9 * latency, 1.1 * latency),
                                       path=path))
    results.append(CandidateResult(
        Candidate(12, "prune=0.90 finetune.epochs=3 quantize=int8", {}, ()), status="failed",
        error="UnsupportedModelError: nothing to prune: no channel group can shrink (Reshape "
              "node_view_10 has unknown shapes)"))
    for key in ("pareto", "pareto_size"):
        figure = (lambda r: r.latency_ratio) if key == "pareto" else (lambda r: r.size_bytes)
        points = [(figure(r), r.metric) if r.metric is not None else None for r in results]
        for record, flag in zip(results, pareto_flags(points), strict=True):
            setattr(record, key, flag)
    return SweepResult(results, "accuracy", {"metric": 0.9956, "samples": 450,
                                             "size_bytes": 521_277, "macs": 2_672_704}, "test", 5)


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("sweep-page")
    page = report_page(crowded_sweep(), "slimgraph sweep digits_cnn.onnx --grid grid.yaml "
                       "--data digits_test.npz --calib digits_calib.npz --report report",
                       "digits_cnn.onnx")
    write_report(folder / "report", page)
    html = (folder / "report" / "report.html").read_text()
    return html, layout(folder / "report" / "report.html", folder / "chromium", width=1280)


def point_labels(texts: list[dict], plot: str) -> list[dict]:
    """The texts of a plot that label points: a candidate's row number, with its value when
    the point sits on the axis' lower edge ("8 (0.12)")."""
    return [t for t in texts if t["plot"] == plot and not t["tick"] and not t["legend"]
            and re.fullmatch(r"\d+( \([\d.]+\))?", t["text"])]


def test_point_labels_overlap_neither_each_other_nor_a_point(measured) -> None:
    _, found = measured
    for plot in ("Latency against accuracy", "Size against accuracy"):
        labels = point_labels(found.texts, plot)
        assert len(labels) == len(FIGURES)  # every candidate that was built is labelled
        for a, b in combinations(labels, 2):
            assert overlap(a["box"], b["box"]) < 1.0, (plot, a["text"], b["text"])
        points = [point["box"] for point in found.points if point["plot"] == plot]
        assert len(points) == len(FIGURES)
        for label in labels:
            for point in points:
                assert overlap(label["box"], point) < 2.0, (plot, label["text"], point)


def test_the_candidates_table_fits_a_1280_px_window(measured) -> None:
    _, found = measured
    assert found.viewport == 1280
    assert found.page <= found.viewport  # no sideways scrolling of the page
    (table,) = found.tables
    assert table["scroll"] <= table["client"]  # nor inside the table's box: nothing hidden
    assert table["table"][2] <= table["box"][2] + 0.5 <= found.viewport


def test_the_accuracy_axis_zooms_to_the_candidates_worth_comparing(measured) -> None:
    html, _ = measured
    latency_plot = html.split('aria-label="Latency against accuracy"')[1].split("</figure>")[0]
    ticks = [float(t) for t in re.findall(r'<g id="p0-ytick_\d+">.*?>([-\d.]+)</text>',
                                          latency_plot, re.S)]
    assert ticks and min(ticks) >= 0.98 and max(ticks) <= 1.0, ticks  # not 0 to 1
    # the two collapsed candidates stay on the plot, on the axis' lower edge, with their value
    assert "8 (0.12)" in latency_plot and "9 (0.1)" in latency_plot
    assert "below 0.99 (drawn at the edge)" in latency_plot


def test_zoom_keeps_every_point_unless_a_few_fall_far_below() -> None:
    assert _zoom([0.99, 0.985, 0.97, 0.12, 0.1]) == 0.97
    assert _zoom([0.99, 0.95, 0.90, 0.85, 0.80]) is None  # evenly spread: all of them
    assert _zoom([0.99, 0.2, 0.1]) is None  # one point above the gap: nothing to zoom to
    assert _zoom([0.5, 0.5]) is None


def test_a_float64_note_is_said_once_per_file_naming_it_as_given(tmp_path: Path) -> None:
    """float64 data (numpy's and scikit-learn's default) for the sweep's data and a finetune
    step's training data: one note each, from the calling process, with the path as typed;
    the jobs on the workers (which read the training data by its absolute path) say nothing."""
    pytest.importorskip("torch")
    with np.load(DIGITS_TEST) as archive:
        images, labels = archive["image"].astype(np.float64), archive["labels"]
    np.savez(tmp_path / "val64.npz", image=images[:200], labels=labels[:200])
    np.savez(tmp_path / "train64.npz", image=images[200:], labels=labels[200:])
    (tmp_path / "grid.yaml").write_text(
        "prune: {ratio: [0.2]}\nfinetune: {data: train64.npz, epochs: [1]}\n")
    done = run_script("sweep", DIGITS, "--grid", "grid.yaml", "--data", "val64.npz",
                      "--workers", "1", "--rounds", "2", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    notes = [line for line in done.stderr.splitlines() if "float64" in line]
    assert notes == [
        "note: val64.npz: 'image' is float64; cast to float32, the model's input type",
        "note: train64.npz: 'image' is float64; cast to float32, the model's input type",
    ], done.stderr
