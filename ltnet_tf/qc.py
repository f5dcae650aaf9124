"""A quality-control picture: mid slices of a scan with its transferred labels on top."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_qc_png(scan: np.ndarray, segmentation: np.ndarray, path: str, title: str = "") -> str:
    """Three orthogonal mid slices, scan in grey with label outlines coloured by label ID."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    rng = np.random.default_rng(0)
    ids = np.unique(segmentation)
    colours = {label: rng.random(3) for label in ids if label != 0}
    for axis, ax in enumerate(axes):
        index = scan.shape[axis] // 2
        image = np.take(scan, index, axis=axis)
        labels = np.take(segmentation, index, axis=axis)
        overlay = np.zeros((*labels.shape, 4))
        for label, colour in colours.items():
            overlay[labels == label] = (*colour, 0.45)
        ax.imshow(np.rot90(image), cmap="gray")
        ax.imshow(np.rot90(overlay))
        ax.set_axis_off()
    figure.suptitle(title)
    figure.tight_layout()
    tmp = f"{path}.tmp.png"
    figure.savefig(tmp, dpi=80)
    plt.close(figure)
    os.replace(tmp, path)
    return path
