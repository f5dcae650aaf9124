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


def jacobian_determinant(flow: np.ndarray) -> np.ndarray:
    """det ∇(x + flow(x)) at every voxel, [D, H, W], for a displacement [D, H, W, 3] in voxels.

    Central differences inside, one-sided at the borders (``np.gradient``). Where it is <= 0 the
    transformation folds space: a registration that buys Dice by tearing anatomy shows up here.
    """
    flow = np.asarray(flow, dtype=np.float64)
    if flow.ndim != 4 or flow.shape[-1] != 3:
        raise ValueError(f"expected a displacement [D, H, W, 3], got shape {flow.shape}")
    # jacobian[..., i, j] = d(x_i + u_i) / d x_j
    jacobian = np.stack([np.stack(np.gradient(flow[..., i]), -1) for i in range(3)], -2)
    jacobian += np.eye(3)
    return np.linalg.det(jacobian)


def folding_fraction(flow: np.ndarray, mask: np.ndarray = None) -> float:
    """Fraction of the voxels (inside ``mask``, if given) whose Jacobian determinant is <= 0."""
    folded = jacobian_determinant(flow) <= 0
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != folded.shape:
            raise ValueError(f"mask shape {mask.shape} != displacement grid {folded.shape}")
        folded = folded[mask]
    return float(folded.mean()) if folded.size else float("nan")
