"""Dice of transferred segmentations against reference label maps, per structure and on average."""
from __future__ import annotations

import numpy as np


def dice_per_label(segmentation: np.ndarray, reference: np.ndarray, label_ids) -> dict:
    """{label ID: Dice} for every foreground ID; NaN where the ID is in neither map."""
    scores = {}
    for label in label_ids:
        if int(label) == 0:
            continue
        predicted, truth = segmentation == label, reference == label
        total = int(predicted.sum()) + int(truth.sum())
        scores[int(label)] = (2.0 * np.logical_and(predicted, truth).sum() / total
                              if total else float("nan"))
    return scores


def evaluation_labels(label_ids, preferred=None) -> list:
    """The structures a mean is taken over: ``preferred`` (e.g. the 28 of the benchmark) when the atlas
    has all of them, otherwise every foreground atlas label."""
    present = [int(i) for i in label_ids if int(i) != 0]
    if preferred and set(preferred) <= set(present):
        return [int(i) for i in preferred]
    return present


def mean_dice(scores: dict, labels) -> float:
    values = [scores[label] for label in labels if label in scores and not np.isnan(scores[label])]
    return float(np.mean(values)) if values else float("nan")
