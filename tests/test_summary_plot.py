"""summary.png stays readable at any number of runs and swept keys: a bounded size, legends
outside the panels, short labels."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from PIL import Image

from cifar_run.outputs import summary_plot
from cifar_run.outputs.run_folders import load_runs
from cifar_run.outputs.summary import summarize, write_summary

from .test_report import make_run

# What the figure was allowed to grow to before: 4,600 pixels wide for many keys.
MAX_PIXELS = (1400, 1800)


def _sweep(root: Path, numeric: bool, runs: int) -> Path:
    """`runs` run folders differing in many keys (numeric ones, or only text ones)."""
    values = itertools.product(
        ["lenet5", "resnet20", "cnn"],
        ["standard", "none", "cutout"],
        [0.01, 0.05, 0.1, 0.2],
        [32, 64],
        [0.0, 0.9],
    )
    for i, (model, augment, lr, batch, momentum) in zip(range(runs), values, strict=False):
        overrides = [f"model=a_rather_long_model_name_{model}", f"augment={augment}_set"]
        if numeric:
            overrides += [f"lr={lr}", f"batch_size={batch}", f"optim.momentum={momentum}"]
            overrides += [f"data.val_size={1000 + i}", f"optim.weight_decay={i * 1e-4:g}"]
        make_run(root / f"{i}_run", overrides, test_acc=40.0 + (i * 7) % 30)
    return root


def _figure(summary: object, monkeypatch: pytest.MonkeyPatch) -> object:
    saved = {}
    monkeypatch.setattr(summary_plot.atomic, "save_figure", lambda fig, path: saved.update(fig=fig))
    summary_plot.plot_summary(summary, Path("unused.png"))
    return saved["fig"]


@pytest.mark.parametrize("numeric", [True, False], ids=["numeric_keys", "text_keys"])
@pytest.mark.parametrize("runs", [3, 40])
def test_summary_figure_is_bounded_and_legends_cover_no_panel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, numeric: bool, runs: int
) -> None:
    summary = summarize(load_runs([_sweep(tmp_path / "sweep", numeric, runs)]))
    written = write_summary(summary, tmp_path / "out")
    with Image.open(next(p for p in written if p.name == "summary.png")) as png:
        assert png.width <= MAX_PIXELS[0] and png.height <= MAX_PIXELS[1], png.size

    fig = _figure(summary, monkeypatch)
    fig.canvas.draw()
    panels = fig.axes
    assert len(panels) <= summary_plot.MAX_PANELS + 1
    for ax in panels:
        legend = ax.get_legend()
        if legend is None:
            continue
        box = legend.get_window_extent()
        for other in panels:
            assert not box.overlaps(other.get_window_extent()), (ax.get_title(), other.get_title())
        labels = [t.get_text() for t in legend.get_texts()]
        assert all(len(label) <= summary_plot.LABEL_CHARS for label in labels), labels
    if not numeric:
        bars = panels[0]
        assert len(bars.patches) == min(runs, summary_plot.MAX_BARS)
        if runs > summary_plot.MAX_BARS:
            assert f"the best {summary_plot.MAX_BARS} of {runs} runs" in bars.get_title()
    elif sum(summary_plot._is_numeric_key(summary.table, k) for k in summary.keys) > 3:
        assert "also swept:" in fig.get_suptitle()


def test_labels_are_short_and_say_when_they_were_cut() -> None:
    assert summary_plot._label({"optim.momentum": 0.9, "lr": 0.1}) == "momentum=0.9, lr=0.1"
    long = summary_plot._label({"model": "x" * 80})
    assert len(long) == summary_plot.LABEL_CHARS and long.endswith("\u2026")
