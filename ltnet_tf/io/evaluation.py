"""Dice of transferred segmentations against reference label maps, per structure and on average."""
from __future__ import annotations

import numpy as np


def dice_per_label(segmentation: np.ndarray, reference: np.ndarray, label_ids) -> dict:
    """{label ID: Dice} for every foreground ID; NaN where the ID is in neither map.

    One pass over the voxels that are labelled in either map (a joint count of label pairs),
    not one per label: a 256³ map with 46 labels in 0.2 s instead of 4.
    """
    segmentation, reference = np.asarray(segmentation).ravel(), np.asarray(reference).ravel()
    labelled = np.flatnonzero((segmentation != 0) | (reference != 0))
    foreground = [int(label) for label in label_ids if int(label) != 0]
    ids = np.asarray(sorted(set(foreground)), np.int64)
    count = len(ids) + 1  # index len(ids): any ID not asked for (background included)

    def index(values):
        values = values[labelled].astype(np.int64)
        position = np.clip(np.searchsorted(ids, values), 0, max(len(ids) - 1, 0))
        known = ids[position] == values if len(ids) else np.zeros(len(values), bool)
        return np.where(known, position, len(ids))

    joint = np.bincount(index(segmentation) * count + index(reference),
                        minlength=count * count).reshape(count, count)
    predicted, truth = joint.sum(1), joint.sum(0)
    scores = {}
    for position, label in enumerate(ids.tolist()):
        total = int(predicted[position]) + int(truth[position])
        scores[label] = 2.0 * joint[position, position] / total if total else float("nan")
    return {label: scores[label] for label in foreground}


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
