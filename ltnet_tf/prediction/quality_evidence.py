"""One scan's label transfer put on the refinement's fine grid, where the quality signals
(``quality_signals``) are measured: each atlas's refined displacement and labels there, their
majority, the scan's brain and its structures.

The fine grid is the refinement's (half resolution: 80 × 96 × 112 for the 160 × 192 × 224 atlas);
a fine voxel stands for the block of atlas-grid voxels it pools. An atlas's labels are read there
by nearest label where its refined displacement takes each block's centre: one gather per voxel
and atlas (a label pull's one-hot vote is not needed for a structure's mean).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

from dataclasses import dataclass
from typing import Optional

import numpy as np
import tensorflow as tf
from scipy import ndimage

from ltnet_tf.registration.native import merged_components
from ltnet_tf.registration.transfer import resample_displacement


@dataclass
class TransferEvidence:
    """What one scan's label transfer produced (``Predictor._transferred_labels``).

    ``scan_affine`` 4×4 of the scan's own grid; ``alignment`` a
    ``registration.alignment.Alignment``; ``similarity`` 'ncc' or 'remap'; ``refined`` the
    refinement's numpy outputs ('warped_atlas' [A, *fine], 'scan' [*fine], 'loss' [A],
    'loss_start' [A]); ``displacement`` an ``inference.Displacement`` with A elements;
    ``transferred`` and ``labels`` [*scan grid] int32, the labels before and after the intensity
    model (the same array when it is off; 0 outside the scan's brain); ``intensity_model`` its
    record or None.
    """
    scan_affine: np.ndarray
    alignment: object
    similarity: str
    refined: dict
    displacement: object
    transferred: np.ndarray
    labels: np.ndarray
    intensity_model: Optional[dict]


class AtlasFacts:
    """What the quality signals need of the atlases, computed once per ``Predictor``: each
    atlas's labels and the map from the primary grid to them, the refinement's fine grid factor,
    and per structure of the primary atlas its volume (mm³) and its share of boundary voxels
    (thin structures have more)."""

    def __init__(self, atlases, factor: int):
        self.factor = int(factor)
        self.atlas_labels = [np.asarray(a.labels.data) for a in atlases.atlases]
        self.labels_from_grid = [None if a.labels_from_grid is None
                                 else np.asarray(a.labels_from_grid, np.float64)
                                 for a in atlases.atlases]
        primary = atlases.primary
        labels = self.atlas_labels[0]
        voxel_mm3 = abs(float(np.linalg.det(np.asarray(primary.labels.affine, float)[:3, :3])))
        ids, counts = np.unique(labels, return_counts=True)
        eroded = ndimage.minimum_filter(labels, size=3, mode="nearest") == ndimage.maximum_filter(
            labels, size=3, mode="nearest")
        interior = np.bincount(labels[eroded].ravel(), minlength=int(ids.max()) + 1)
        self.volume_mm3 = {int(i): float(c) * voxel_mm3 for i, c in zip(ids, counts) if i}
        self.boundary_share = {int(i): 1.0 - interior[i] / float(c)
                               for i, c in zip(ids, counts) if i}

    def warped_labels(self, index: int, flow: np.ndarray) -> np.ndarray:
        """Atlas ``index``'s labels on the fine grid, read (nearest label) where ``flow`` [*fine,
        3] (the refined displacement there, in atlas-grid voxels) takes each fine voxel's centre."""
        f = float(self.factor)
        grid = np.indices(flow.shape[:3], dtype=np.float32).transpose(1, 2, 3, 0)
        points = (grid * f + (f - 1.0) / 2.0 + flow).reshape(-1, 3)
        matrix = self.labels_from_grid[index]
        if matrix is not None:
            points = points @ matrix[:3, :3].T.astype(np.float32) + matrix[:3, 3]
        labels = self.atlas_labels[index]
        voxel = np.rint(points).astype(np.int64)
        for axis, size in enumerate(labels.shape):
            np.clip(voxel[:, axis], 0, size - 1, out=voxel[:, axis])
        return labels[voxel[:, 0], voxel[:, 1], voxel[:, 2]].reshape(flow.shape[:3])


def fine_flow(element, factor: int, shape) -> np.ndarray:
    """One atlas's refined displacement (``Displacement.element``) on the fine grid of ``shape``,
    in atlas-grid voxels [*shape, 3] float32."""
    ((values, finest),) = merged_components(element)
    if finest != factor:  # G_F's displacement on a finer grid than the refinement's: onto it
        values = resample_displacement(tf.convert_to_tensor(values)[None], finest / factor,
                                       shape)[0]
    values = np.asarray(values, np.float32)[:shape[0], :shape[1], :shape[2]]
    if values.shape[:3] != tuple(shape):
        raise ValueError(f"the displacement's grid (factor {factor}, {values.shape[:3]}) does "
                         f"not cover the refinement's ({shape})")
    return values * float(factor)


class FineGrid:
    """One scan's label transfer on the refinement's fine grid: the scan (``scan`` [*fine], as
    the refinement normalised it), the warped atlases (``warped`` [A, *fine]), each atlas's
    displacement (``flows``, atlas-grid voxels) and labels (``atlas_labels`` [A, *fine]) there,
    their majority (``fused``), the brain (``brain``: the scan's non-zero voxels), the structures
    (``ids`` [L]) and each voxel's structure number (``region``: 1..L, 0 none)."""

    def __init__(self, evidence: TransferEvidence, facts: AtlasFacts):
        self.scan = np.asarray(evidence.refined["scan"], np.float32)
        self.warped = np.asarray(evidence.refined["warped_atlas"], np.float32)
        self.flows = [fine_flow(evidence.displacement.element(k), facts.factor, self.scan.shape)
                      for k in range(len(self.warped))]
        self.atlas_labels = np.stack([facts.warped_labels(k, flow)
                                      for k, flow in enumerate(self.flows)])
        self.fused = majority(self.atlas_labels)
        self.brain = self.scan > 0
        ids = np.array(sorted(set(np.unique(self.fused).tolist()) | set(facts.volume_mm3)),
                       np.int64)
        self.ids = ids[ids != 0]
        self.index = np.zeros(int(max(self.ids.max(initial=0), self.atlas_labels.max())) + 1,
                              np.int64)
        self.index[self.ids] = np.arange(1, len(self.ids) + 1)
        self.region = self.index[self.fused]
        self.count = len(self.ids)
        self.inside = np.flatnonzero(self.brain)  # the brain's voxels, flat
        self.region_inside = self.region.ravel()[self.inside]
        self.sizes_inside = np.bincount(self.region_inside, minlength=self.count + 1)

    def means(self, values: np.ndarray) -> np.ndarray:
        """[L] each structure's mean of ``values`` [*fine] inside the brain (0 if none there)."""
        sums = np.bincount(self.region_inside, minlength=self.count + 1, weights=np.asarray(
            values, np.float64).ravel()[self.inside])
        return (sums / np.maximum(self.sizes_inside, 1))[1:]

    def spreads(self, values: np.ndarray) -> np.ndarray:
        """[L] each structure's standard deviation of ``values`` inside the brain."""
        return np.sqrt(np.maximum(self.means(values * values) - self.means(values) ** 2, 0.0))


def majority(labels: np.ndarray) -> np.ndarray:
    """[A, *grid] -> [*grid]: the label most atlases give (ties: the earlier atlas's)."""
    if len(labels) == 1:
        return labels[0]
    votes = np.stack([np.sum(labels == labels[a], axis=0) for a in range(len(labels))])
    choice = np.argmax(votes, axis=0)
    return np.take_along_axis(labels, choice[None], 0)[0]
