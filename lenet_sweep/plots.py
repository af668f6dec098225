"""The study's figures, as matplotlib Figures (no pyplot state, no display needed).

Histories are lists of per-epoch rows ({"loss": ..., "val_loss": ..., ...}); epoch numbers are 1-based.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure


def _series(history: Sequence[dict], key: str) -> np.ndarray:
    return np.array([row.get(key, np.nan) for row in history], dtype=float)


def turning_point(history: Sequence[dict]) -> int:
    """The 1-based epoch of minimum validation loss: where overfitting begins (0 if unknown)."""
    val = _series(history, "val_loss")
    if not len(val) or np.all(np.isnan(val)):
        return 0
    return int(np.nanargmin(val)) + 1


def curves(history: Sequence[dict], metric: str, title: str, magnify: bool = False) -> Figure:
    """Training and validation `metric` per epoch; `magnify` zooms on the epochs after the first.

    The magnified view drops epoch 1 (whose loss dwarfs the rest) from the y range, so the point
    where validation loss turns up is visible; the turning point is marked.
    """
    fig = Figure(figsize=(6, 4), dpi=100)
    _draw_curves(fig.add_subplot(), history, metric, title, magnify)
    fig.tight_layout()
    return fig


def val_loss_vs_val_accuracy(history: Sequence[dict], title: str) -> Figure:
    """Validation loss against validation accuracy, one point per epoch, labelled with its epoch."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    fig.colorbar(_draw_val_scatter(ax, history, title), ax=ax, label="epoch")
    fig.tight_layout()
    return fig


def trial_curves(history: Sequence[dict], title: str, restarts: Sequence[int] = ()) -> Figure:
    """The study's four figures for one trial in one image: loss, magnified loss, accuracy, and
    validation loss against validation accuracy (one image per trial keeps the logging cheap).
    `restarts`: epochs after which a later Hyperband round took over, drawn as dotted lines."""
    fig = Figure(figsize=(11, 7.5), dpi=80)
    axes = fig.subplots(2, 2)
    _draw_curves(axes[0, 0], history, "loss", "loss")
    _draw_curves(axes[0, 1], history, "loss", "loss, magnified", magnify=True)
    _draw_curves(axes[1, 0], history, "accuracy", "accuracy")
    for ax in (axes[0, 0], axes[0, 1], axes[1, 0]):
        for epoch in restarts:
            ax.axvline(epoch + 0.5, color="black", linestyle=":", linewidth=1)
    _draw_val_scatter(axes[1, 1], history, "validation loss vs accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _draw_curves(ax, history: Sequence[dict], metric: str, title: str, magnify: bool = False) -> None:
    train, val = _series(history, metric), _series(history, f"val_{metric}")
    epochs = np.arange(1, len(train) + 1)
    ax.plot(epochs, train, "o-", label=f"training {metric}", markersize=3)
    ax.plot(epochs, val, "o-", label=f"validation {metric}", markersize=3)
    if metric == "loss" and len(epochs):
        tp = turning_point(history)
        if tp:
            ax.axvline(tp, color="grey", linestyle="--", linewidth=1, label=f"min val loss (epoch {tp})")
    if magnify and len(epochs) > 2:
        rest = np.concatenate([train[1:], val[1:]])
        rest = rest[np.isfinite(rest)]
        if len(rest):
            lo, hi = rest.min(), rest.max()
            pad = 0.05 * (hi - lo or 1.0)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlim(1.5, len(epochs) + 0.5)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()


def _draw_val_scatter(ax, history: Sequence[dict], title: str):
    loss, acc = _series(history, "val_loss"), _series(history, "val_accuracy")
    ax.plot(acc, loss, "-", color="lightgrey", zorder=1)
    points = ax.scatter(acc, loss, c=np.arange(1, len(loss) + 1), cmap="viridis", zorder=2)
    for i, (a, v) in enumerate(zip(acc, loss), start=1):
        if np.isfinite(a) and np.isfinite(v):
            ax.annotate(str(i), (a, v), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("validation accuracy")
    ax.set_ylabel("validation loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return points


def score_by_value(rows: Sequence[dict], names: Sequence[str], score: str, title: str) -> Figure:
    """`score` against each hyperparameter in `names`, one panel each, one point per trial.

    Numbers are plotted on a numeric axis (log where they span more than a decade); anything else as
    categories, with a little horizontal jitter so equal scores stay visible.
    """
    cols = min(3, max(1, len(names)))
    nrows = max(1, -(-len(names) // cols))
    fig = Figure(figsize=(4 * cols, 3.2 * nrows), dpi=80)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    jitter = np.random.default_rng(0)
    for ax, name in zip(axes, names):
        pairs = [(row[name], row[score]) for row in rows if row.get(name) is not None and row.get(score) is not None]
        ys = np.array([y for _, y in pairs], dtype=float)
        numeric = pairs and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pairs)
        if numeric:
            xs = np.array([x for x, _ in pairs], dtype=float)
            ax.scatter(xs, ys, s=18, alpha=0.8)
            if xs.min() > 0 and xs.max() / xs.min() > 10:
                ax.set_xscale("log")
        elif pairs:
            levels = sorted({str(x) for x, _ in pairs})
            xs = np.array([levels.index(str(x)) for x, _ in pairs], dtype=float)
            ax.scatter(xs + jitter.uniform(-0.12, 0.12, len(xs)), ys, s=18, alpha=0.8)
            ax.set_xticks(range(len(levels)), levels)
        ax.set_title(name)
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def groups_side_by_side(groups: dict[str, Sequence[float]], score: str, title: str) -> Figure:
    """A box and the points of `score` for each group (e.g. relu vs softmax output), with n and mean."""
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    names = list(groups)
    data = [np.asarray(groups[n], dtype=float) for n in names]
    if names:
        ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False)
        jitter = np.random.default_rng(0)
        for i, d in enumerate(data, start=1):
            ax.scatter(i + jitter.uniform(-0.1, 0.1, len(d)), d, s=16, alpha=0.8, zorder=3)
        labels = [f"{n}\nn={len(d)}, mean {np.mean(d):.3f}" if len(d) else f"{n}\nn=0" for n, d in zip(names, data)]
        ax.set_xticks(range(1, len(names) + 1), labels)
    ax.set_ylabel(score)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: Sequence[str], columns: int, title: str) -> Figure:
    """A grid of uint8 images (N, H, W, 3) with one caption each."""
    rows = max(1, int(np.ceil(len(images) / columns)))
    fig = Figure(figsize=(2 * columns, 2.2 * rows), dpi=100)
    for i in range(rows * columns):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.set_title(titles[i], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [true class, predicted class]."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, int), np.asarray(predictions, int)), 1)
    return matrix


def confusion_figure(matrix: np.ndarray, names: Sequence[str], title: str) -> Figure:
    """The confusion matrix as a heat map of row shares, with the counts written in."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(5, 0.6 * len(names) + 2)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(
            j, i, str(count), ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black"
        )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    return fig


def turning_points(families: dict[str, Sequence[int]], title: str) -> Figure:
    """How many runs' validation loss turned up at each epoch, one panel per model family."""
    from matplotlib.ticker import MaxNLocator

    names = list(families) or ["(no runs)"]
    last = max((max(v) for v in families.values() if len(v)), default=1)
    fig = Figure(figsize=(6, 2.2 * len(names) + 0.6), dpi=90)
    axes = np.atleast_1d(fig.subplots(len(names), 1, squeeze=False)).ravel()
    for ax, name in zip(axes, names):
        epochs = np.asarray(families.get(name, []), dtype=int)
        if len(epochs):
            values, counts = np.unique(epochs, return_counts=True)
            ax.bar(values, counts, width=0.8)
        ax.set_xlim(0.5, last + 0.5)  # one epoch axis for every family, so they compare by eye
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{name} (n={len(epochs)})", fontsize=9)
        ax.set_xlabel("epoch of minimum validation loss")
        ax.set_ylabel("runs")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def cost_fronts(panels: Sequence[dict], score: str, title: str) -> Figure:
    """One panel per cost, `score` against it: every point in grey, the Pareto front's members highlighted
    and joined, cheapest first. A panel: {"cost": axis label, "points": [(cost, score)], "front": [(cost,
    score)]}; its cost axis is logarithmic where the costs span more than a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig = Figure(figsize=(4.2 * max(1, len(panels)), 3.6), dpi=90)
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)), squeeze=False)).ravel()
    for ax, panel in zip(axes, panels):
        points = np.array(panel["points"], dtype=float).reshape(-1, 2)
        front = np.array(panel["front"], dtype=float).reshape(-1, 2)
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=16, color="lightgrey", label="configuration", zorder=2)
        if len(front):
            ax.plot(front[:, 0], front[:, 1], "o-", color="tab:red", markersize=5, label="front", zorder=3)
        if len(points) and points[:, 0].min() > 0 and points[:, 0].max() / points[:, 0].min() > 10:
            ax.set_xscale("log")
            # 1-2-5 ticks written plainly: a short log axis otherwise gets one label, or overlapping ones
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        if not len(points):
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xlabel(panel["cost"])
        ax.set_ylabel(score)
        ax.grid(alpha=0.3)
        if len(points):
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
