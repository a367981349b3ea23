"""report.html for every report kind, rendered in headless Chromium: plots present, nothing
fetched from the network (NetLog of the page's requests, and no remote src/href in the DOM)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from slimgraph.api.sweep import Candidate, CandidateResult, SweepResult, pareto_flags
from slimgraph.tools.report import render_html, write_report
from slimgraph.tools.sweep_cmd import report_page
from tests.kit.data import DIGITS, DIGITS_CALIB
from tests.tools.chromium import remote_references, render

# command -> (arguments after MODEL -o OUT, text the page must show: titles and torch layer names)
COMMANDS = {
    "quantize": (["--calib", DIGITS_CALIB, "--no-progress"],
                 ["Per-tensor SQNR", "block1.conv2 [act]", "stem.0 [weight]", "After / before"]),
    "prune": (["--ratio", "0.4"], ["Output channels per layer", "block2.conv1", "Channel groups"]),
    "factorize": (["--rank-ratio", "0.5"],
                  ["Rank per layer", "block1.conv1 [tucker2]", "fc [svd]"]),
    "optimize": ([], ["Time per pass", "Nodes after each pass", "fuse-batchnorm"]),
}


def _check_page(folder: Path, work: Path, expected_text: list[str]) -> str:
    """Render DIR/report.html; the page has one inline <svg> per plot of report.json and loads
    nothing from the network. Returns the DOM."""
    data = json.loads((folder / "report.json").read_text())
    page = folder / "report.html"
    rendered = render(page, work)
    assert rendered.page_requests == []
    assert remote_references(page.read_text()) == []
    assert remote_references(rendered.dom) == []
    plots = data.get("plots", [])
    assert plots, "a report page without plots"
    assert rendered.dom.count("<svg") == len(plots)
    assert rendered.dom.count('<figure class="plot"') == len(plots)
    for text in [data["title"], *expected_text]:
        assert text in rendered.dom, text
    return rendered.dom


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_command_report_page(cli, tmp_path: Path, command: str) -> None:
    extra, expected = COMMANDS[command]
    out, folder = tmp_path / "out.onnx", tmp_path / "report"
    result = cli(command, DIGITS, "-o", out, *extra, "--report", folder)
    assert result.code == 0, result.err
    assert sorted(p.name for p in folder.iterdir()) == ["report.html", "report.json", "report.txt"]
    assert (folder / "report.txt").read_text().strip() == result.out.strip()
    data = json.loads((folder / "report.json").read_text())
    assert data["command"].startswith(f"slimgraph {command} ")
    size = data["summary"]["size"]
    assert "→" in size and size.endswith("x)")
    _check_page(folder, tmp_path / "chromium", expected)


def test_sweep_report_page(tmp_path: Path) -> None:
    figures = [(1.0, 0.99, 520_000), (0.25, 0.99, 126_000), (0.4, 0.95, 250_000),
               (0.2, 0.90, 66_000), (0.5, 0.80, 150_000)]
    results = []
    for i, (latency, metric, size) in enumerate(figures):
        candidate = Candidate(i, f"prune={i / 10} quantize=int8", {"prune": {"ratio": i / 10}}, ())
        results.append(CandidateResult(candidate, latency_ratio=latency, metric=metric,
                                       size_bytes=size, macs=1000, latency_interval=(0.9 * latency,
                                       1.1 * latency)))
    failed = CandidateResult(Candidate(5, "broken", {}, ()), status="failed", error="boom")
    results.append(failed)
    for record, flag in zip(results, pareto_flags([(r.latency_ratio, r.metric) if r.metric
                                                   else None for r in results]), strict=True):
        record.pareto = flag
    assert [r.pareto for r in results] == [False, True, False, True, False, False]
    result = SweepResult(results, "accuracy", {"metric": 0.99, "samples": 450}, "test", 5)
    folder = tmp_path / "report"
    write_report(folder, report_page(result, "slimgraph sweep m.onnx --grid g.yaml", "m.onnx"))
    dom = _check_page(folder, tmp_path / "chromium", ["Latency against accuracy", "Pareto front",
                                                         "failed: boom"])
    assert dom.count('<tr class="pareto">') == 2


def test_hand_built_report_line_and_barh(tmp_path: Path) -> None:
    """The schema the finetune (training curves) and sensitivity (per-layer bars) commands use."""
    report = {
        "title": "Fine-tune digits_cnn", "command": "slimgraph finetune m.onnx -o f.onnx",
        "summary": {"accuracy": "0.62 → 0.97", "epochs": 3},
        "notes": ["measured on 450 rows"],
        "plots": [
            {"kind": "line", "title": "Training curves", "x_label": "epoch", "y_label": "loss",
             "series": [{"name": "train", "x": [1, 2, 3], "y": [0.9, 0.4, 0.2]},
                        {"name": "validation", "x": [1, 2, 3], "y": [1.0, 0.5, 0.3]}]},
            {"kind": "barh", "title": "Sensitivity per layer", "x_label": "accuracy drop",
             "series": [{"name": "int8", "x": ["stem.0", "block1.conv1", "fc"],
                         "y": [0.001, 0.02, "inf"]}]},
        ],
        "tables": [{"title": "Epochs", "columns": ["epoch", "loss"], "rows": [[1, 0.9]]}],
    }
    folder = tmp_path / "report"
    written = write_report(folder, report)
    assert [p.name for p in written] == ["report.json", "report.html"]
    dom = _check_page(folder, tmp_path / "chromium", ["Training curves", "block1.conv1",
                                                        "validation", "0.62 → 0.97"])
    assert "measured on 450 rows" in dom


def test_page_screenshot_is_drawn(cli, tmp_path: Path) -> None:
    folder = tmp_path / "report"
    assert cli("prune", DIGITS, "-o", tmp_path / "p.onnx", "--ratio", "0.5",
               "--report", folder).code == 0
    shot = render(folder / "report.html", tmp_path / "chromium", screenshot=True).screenshot
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (2400, 1100)
    # the bars: a good share of the page is the plots' blue, not the background
    blue = np.all(np.abs(pixels[..., :3] - np.array([0x25, 0x63, 0xEB]) / 255) < 0.05, axis=-1)
    assert blue.mean() > 0.01


def test_checks_catch_a_page_that_loads_from_the_network(tmp_path: Path) -> None:
    """Negative control: the two checks above do see remote loads."""
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="http://example.invalid/x.png">'
                    '<style>@import "https://cdn.example.invalid/a.css";</style></body></html>')
    rendered = render(page, tmp_path / "chromium")
    assert "http://example.invalid/x.png" in rendered.page_requests
    assert len(remote_references(page.read_text())) == 2


def test_unknown_plot_kind_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown kind 'pie'"):
        write_report(tmp_path / "r", {"plots": [{"kind": "pie", "title": "x", "series": []}]})
    assert not (tmp_path / "r").exists()


def test_infinite_values_are_drawn_at_the_largest_finite_one() -> None:
    page = render_html({"plots": [{"kind": "barh", "title": "t", "series": [
        {"name": "s", "x": ["a", "b"], "y": [3.0, math.inf]}]}]})
    assert page.count("<svg") == 1


def test_report_without_matplotlib_names_the_extra(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "p.onnx"
    result = cli("prune", DIGITS, "-o", out, "--ratio", "0.5", "--report", tmp_path / "r")
    assert result.code == 2
    assert result.err.strip().splitlines() == [
        "slimgraph prune: error: --report draws its plots with matplotlib, which is not "
        "installed: pip install 'slimgraph[report]'"
    ]
    assert not out.exists() and not (tmp_path / "r").exists()


def test_long_bar_charts_draw_their_first_rows() -> None:
    names = [f"layers.{i}.conv" for i in range(300)]
    page = render_html({"plots": [{"kind": "barh", "title": "SQNR", "series": [
        {"name": "s", "x": names, "y": list(range(300))}]}]})
    assert "SQNR (first 120 of 300)" in page
    assert "layers.119.conv" in page and "layers.120.conv" not in page
