"""Segmentations and volumes on the scan's own grid.

A scan that was aligned to the atlas is segmented on the atlas grid, but users want the answer on
the grid they gave: FreeSurfer's 256³ volume, the scanner's anisotropic oblique slab. Resampling an
atlas-space segmentation back with nearest-neighbour would interpolate labels twice. Instead each
native voxel v is followed through the composed map — native voxel -> (affine) -> atlas-grid point
q -> (displacement, interpolated at q) -> atlas point q + Δp(q) — and the atlas labels are read there
once, with the same one-hot-linear vote as on the atlas grid (``inference.labels_at_points``).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import numpy as np
import tensorflow as tf

from ltnet_tf import inference

# Native voxels are processed this many at a time (memory ~100 bytes per point).
POINTS_PER_CHUNK = 1 << 21


class NativeLabelPull(tf.Module):
    """Pulls one atlas's labels onto native grids; the atlas's cell labels are computed once."""

    def __init__(self, atlas_labels: np.ndarray):
        super().__init__(name="native_label_pull")
        self.atlas_labels = tf.constant(np.asarray(atlas_labels, np.int32))
        self.atlas_cells = inference.uniform_cell_labels(self.atlas_labels)
        self.atlas_shape = tuple(int(s) for s in atlas_labels.shape)
        found = np.argwhere(np.asarray(atlas_labels) != 0)
        self.label_box = (found.min(0), found.max(0)) if len(found) else None

    def __call__(self, flow: np.ndarray, native_to_atlas_voxel: np.ndarray, native_shape) -> np.ndarray:
        """flow [D, H, W, 3] on the atlas grid (pull, voxels), 4x4 native voxel -> atlas voxel
        map, native shape -> label IDs [*native_shape] int32 (0 where no atlas label lands)."""
        native_shape = tuple(int(s) for s in native_shape)
        segmentation = np.zeros(int(np.prod(native_shape)), np.int32)
        if self.label_box is None:
            return segmentation.reshape(native_shape)
        points = _native_points_in_reach(native_to_atlas_voxel, native_shape, self.label_box,
                                         float(np.abs(flow).max()) + 1.0)
        flow = tf.constant(np.asarray(flow, np.float32))
        for start in range(0, len(points[0]), POINTS_PER_CHUNK):
            flat_index = points[0][start:start + POINTS_PER_CHUNK]
            atlas_points = points[1][start:start + POINTS_PER_CHUNK]
            segmentation[flat_index] = self._labels(flow, tf.constant(atlas_points)).numpy()
        return segmentation.reshape(native_shape)

    @tf.function(reduce_retracing=True)
    def _labels(self, flow, atlas_points):
        limit = tf.constant([s - 1 for s in self.atlas_shape], tf.float32)
        on_grid = tf.clip_by_value(atlas_points, 0.0, limit)
        displaced = on_grid + inference.sample_linear(flow, on_grid)
        displaced = tf.clip_by_value(displaced, 0.0, limit)
        return inference.labels_at_points(self.atlas_labels, displaced[None], self.atlas_cells)[0]


def _native_points_in_reach(native_to_atlas_voxel, native_shape, label_box, reach):
    """(flat native indices, their atlas-grid coordinates [N, 3] float32) of the native voxels that
    fall inside the atlas grid and within ``reach`` voxels of a labelled atlas voxel; the others can
    only be background. Computed one native slab at a time to bound memory."""
    matrix = np.asarray(native_to_atlas_voxel, np.float64)
    low = np.asarray(label_box[0], np.float64) - reach
    high = np.asarray(label_box[1], np.float64) + reach
    j, k = np.meshgrid(np.arange(native_shape[1]), np.arange(native_shape[2]), indexing="ij")
    plane = np.stack([j.ravel(), k.ravel()], -1).astype(np.float64)
    plane_in_atlas = plane @ matrix[:3, 1:3].T + matrix[:3, 3]
    indices, coordinates = [], []
    for i in range(native_shape[0]):
        q = plane_in_atlas + i * matrix[:3, 0]
        keep = np.all((q >= low) & (q <= high), axis=1)
        if keep.any():
            indices.append(np.flatnonzero(keep) + i * len(plane))
            coordinates.append(q[keep].astype(np.float32))
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
    return np.concatenate(indices), np.concatenate(coordinates)


# ------------------------------------------------------------------------------ volumes
def structure_volumes_mm3(segmentation: np.ndarray, affine: np.ndarray, label_ids) -> dict:
    """{label ID: volume in mm³} on the segmentation's own grid (voxel count x voxel volume)."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    ids, counts = np.unique(np.asarray(segmentation), return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist()))
    return {int(label): found.get(int(label), 0) * voxel_mm3 for label in label_ids
            if int(label) != 0}
