"""Figures a person would rather look at than read: sizes, labels, axis limits and the data they show."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image
import matplotlib.pyplot as plt
import pytest
import torch

from tinylm.checkpoint import load_run
from tinylm.viz import (
    MAX_FIGSIZE,
    attention_figure,
    generation_attention,
    plot_training_progress,
    smooth,
    training_figure,
    visualize_generation_attention,
)

MAX_PIXELS = (MAX_FIGSIZE[0] * 100, MAX_FIGSIZE[1] * 100)  # width, height at the figures' 100 dpi


def png_size(path):
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


def rows_with(evals, epochs=()):
    train = [{"type": "train", "step": s, "loss": 4.0 - s / 60, "lr": 1e-3} for s in range(1, 61)]
    return train + list(evals) + list(epochs)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_smooth_is_a_debiased_moving_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 0.5 * 1.0 / (1 - 0.25)])
    assert smooth([3.0, 1.0], 0.0) == [3.0, 1.0]


def test_one_validation_point_shares_the_training_axis_and_is_visible():
    fig = training_figure(rows_with([{"type": "eval", "step": 60, "val_loss": 3.14}]))
    ax, ax_lr = fig.axes[:2]
    lines = lines_by_label(ax)
    assert {"training loss", "training loss (smoothed)", "validation loss"} <= set(lines)
    assert list(lines["validation loss"].get_xdata()) == [60]
    low, high = ax.get_ylim()
    assert low < 3.0 and high > 3.98  # the training range (3.0 to 3.98) and the point, not 0.96 to 1.04
    assert ax_lr.get_ylabel() == "learning rate" and ax_lr.get_shared_x_axes().joined(ax, ax_lr)
    assert fig.get_size_inches()[0] <= MAX_FIGSIZE[0] and fig.get_size_inches()[1] <= MAX_FIGSIZE[1]
    plt.close(fig)


def test_epochs_are_marked_with_integer_ticks():
    epochs = [
        {"type": "epoch", "step": 20 * e, "epoch": e, "train_loss": 3.5, "val_loss": 3.4} for e in (1, 2, 3)
    ]
    fig = training_figure(rows_with([], epochs))
    ax = fig.axes[0]
    fig.canvas.draw()
    (top,) = ax.child_axes
    assert [t.get_text() for t in top.get_xticklabels()] == ["1", "2", "3"] and top.get_xlabel() == "epoch"
    assert list(lines_by_label(ax)["validation loss"].get_xdata()) == [20, 40, 60]  # epoch rows as validation
    plt.close(fig)


def test_training_png_fits_a_screen(tiny_run, tmp_path):
    width, height = png_size(plot_training_progress(tiny_run, tmp_path / "loss.png"))
    assert width <= MAX_PIXELS[0] and height <= MAX_PIXELS[1]  # the old figure was 1,760 pixels wide


def test_attention_grid_shows_each_layer_and_head_with_readable_labels(tiny_run):
    run = load_run(tiny_run)
    context, generated, steps = generation_attention(run.model, run.tokenizer, "ROMEO:", 5)
    n_layer, n_head = steps[0].shape[:2]
    fig = attention_figure(context, generated, steps)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == n_layer * (n_head + 1)  # each head, and each layer's mean of heads
    first = panels[0]
    assert len(first.get_yticklabels()) == 5  # one row per generated token (the old figure had 32 rows)
    assert [t.get_text() for t in panels[-1].get_xticklabels()][:6] == list("ROMEO:")
    image = first.images[0].get_array()  # layer 0, head 0: token i attends over len(context) + i positions
    for i, weights in enumerate(steps):
        n = len(context) + i
        assert torch.equal(torch.from_numpy(image.data[i, :n]).float(), weights[0, 0].float())
        assert image.mask[i, n:].all()
    colour_bars = [ax for ax in fig.axes if not ax.images and "attention weight" in ax.get_ylabel()]
    assert colour_bars
    plt.close(fig)


def test_attention_average_is_the_mean_over_layers_and_heads(tiny_run):
    run = load_run(tiny_run)
    context, generated, steps = generation_attention(run.model, run.tokenizer, "ROMEO:", 3)
    fig = attention_figure(context, generated, steps, average=True)
    (panel,) = [ax for ax in fig.axes if ax.images]
    image = panel.images[0].get_array()
    for i, weights in enumerate(steps):
        expected = weights.double().mean(dim=(0, 1)).numpy()
        assert image.data[i, : len(context) + i] == pytest.approx(expected, abs=1e-6)
    plt.close(fig)


def test_attention_png_fits_a_screen(tiny_run, tmp_path):
    run = load_run(tiny_run)
    path = visualize_generation_attention(run.model, run.tokenizer, "ROMEO:", 5, tmp_path / "a.png")
    width, height = png_size(path)
    assert width <= MAX_PIXELS[0] and height <= MAX_PIXELS[1]  # the old figure was 880 x 4,532 pixels
