"""Figures for papers: training curves, ROC curves, confusion matrices, saliency overlays (matplotlib).

Figures are plain :class:`matplotlib.figure.Figure` objects drawn on an Agg canvas of their own: no pyplot, so the
process's backend (a user's notebook, an interactive session) and pyplot's figure list are never touched.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve


def new_figure(figsize: tuple[float, float]) -> Figure:
    """A figure outside pyplot, on its own Agg canvas (nothing to close: it is freed with its last reference)."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (making folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def training_curves(
    metrics_csv: str | Path,
    path: str | Path,
    keys: Sequence[str] = ("train_loss_epoch", "val_loss", "val_auc", "val_acc"),
) -> Path:
    """Plot per-epoch values logged by Lightning's CSVLogger (``logs/metrics.csv``)."""
    series: dict[str, dict[int, float]] = {k: {} for k in keys}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("epoch"):
                continue
            epoch = int(float(row["epoch"]))
            for k in keys:
                if row.get(k):
                    series[k][epoch] = float(row[k])
    present = [k for k in keys if series[k]]
    fig = new_figure((3.2 * max(1, len(present)), 3))
    axes = fig.subplots(1, max(1, len(present)))
    for ax, k in zip(np.atleast_1d(axes), present):
        epochs = sorted(series[k])
        ax.plot(epochs, [series[k][e] for e in epochs], marker=".")
        ax.set_title(k)
        ax.set_xlabel("epoch")
    return save_figure(fig, path)


def roc_curves(labels: np.ndarray, scores: np.ndarray, task: str, names: Sequence[str], path: str | Path) -> Path:
    """One-vs-rest ROC per class (binary: the positive class; multi-label: per label)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores)
    fig = new_figure((4.5, 4.5))
    ax = fig.subplots()
    if task == "binary-class":
        positive = scores[:, -1] if scores.ndim == 2 else scores
        curves = [(names[-1] if names else "positive", labels.reshape(-1), positive)]
    elif task == "multi-label":
        curves = [(names[i], labels[:, i], scores[:, i]) for i in range(scores.shape[1])]
    else:
        flat = labels.reshape(-1)
        curves = [(names[i], (flat == i).astype(int), scores[:, i]) for i in range(scores.shape[1])]
    for name, y, s in curves:
        if len(np.unique(y)) < 2:
            continue  # ROC undefined without both classes present
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=str(name)[:24])
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def confusion_matrix_plot(matrix: Sequence[Sequence[int]], names: Sequence[str], path: str | Path) -> Path:
    m = np.asarray(matrix)
    fig = new_figure((1.0 + 0.6 * len(names), 0.8 + 0.6 * len(names)))
    ax = fig.subplots()
    ax.imshow(m, cmap="Blues")
    ax.set_xticks(range(len(names)), [str(n)[:12] for n in names], rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), [str(n)[:12] for n in names], fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color="black" if m[i, j] < m.max() / 2 else "white")
    return save_figure(fig, path)


def overlay(image: np.ndarray, heat: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Show a 2D image (H x W or H x W x 3, any range) with a heat map over it, side by side with the image alone."""
    img = np.asarray(image, dtype=float)
    img = (img - img.min()) / (np.ptp(img) or 1.0)
    fig = new_figure((5, 2.7))
    axes = fig.subplots(1, 2)
    for ax in axes:
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        ax.axis("off")
    axes[1].imshow(heat, cmap="jet", alpha=0.45, extent=(-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5))
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def saliency_grid(
    images: Sequence[np.ndarray], rows: dict[str, Sequence[np.ndarray]], path: str | Path, titles: Sequence[str] = ()
) -> Path:
    """The same 2D test images (top row) with each model's heat map over them (one row per model, ``rows`` maps a
    model's name to its maps in ``images``' order): plain and boosted models read side by side."""
    fig = new_figure((1.6 * len(images), 1.7 * (1 + len(rows))))
    axes = np.asarray(fig.subplots(1 + len(rows), len(images), squeeze=False))
    for j, image in enumerate(images):
        img = np.asarray(image, dtype=float)
        img = (img - img.min()) / (np.ptp(img) or 1.0)
        for i, (name, maps) in enumerate([("image", None), *rows.items()]):
            ax = axes[i, j]
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            if maps is not None:
                extent = (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)
                ax.imshow(maps[j], cmap="jet", alpha=0.45, extent=extent)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name, fontsize=7)
            if i == 0 and j < len(titles):
                ax.set_title(titles[j], fontsize=7)
    return save_figure(fig, path)
