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

import itertools

import numpy as np
import tensorflow as tf

from ltnet_tf.registration import transfer as inference

# Native voxels are processed this many at a time (memory ~100 bytes per point).
POINTS_PER_CHUNK = 1 << 21


class NativeLabelPull(tf.Module):
    """Pulls one atlas's labels onto native grids; the atlas's cell labels are computed once.

    ``atlas_labels`` [D', H', W'] label IDs. ``labels_from_grid``: 4x4 map from the voxels of the
    grid the displacement lives on (the primary atlas's, onto which scans are aligned) to this
    atlas's voxels, for an atlas kept on a grid of its own (None: the same grid).
    """

    def __init__(self, atlas_labels: np.ndarray, labels_from_grid: np.ndarray = None):
        super().__init__(name="native_label_pull")
        self.atlas_labels = tf.constant(np.asarray(atlas_labels, np.int32))
        self.atlas_cells = inference.uniform_cell_labels(self.atlas_labels)
        self.atlas_shape = tuple(int(s) for s in atlas_labels.shape)
        self.labels_from_grid = (None if labels_from_grid is None
                                 else tf.constant(np.asarray(labels_from_grid, np.float32)))
        found = np.argwhere(np.asarray(atlas_labels) != 0)
        box = (found.min(0), found.max(0)) if len(found) else None
        if box is not None and labels_from_grid is not None:  # the box on the displacement's grid
            corners = np.array(list(itertools.product(*zip(*box))), np.float64)
            on_grid = (np.linalg.inv(labels_from_grid) @ np.c_[corners, np.ones(8)].T).T[:, :3]
            box = (on_grid.min(0), on_grid.max(0))
        self.label_box = box

    def __call__(self, displacement, native_to_atlas_voxel: np.ndarray, native_shape,
                 grid_shape=None, mask: np.ndarray = None) -> np.ndarray:
        """``displacement``: [(values [d, h, w, 3], grid factor)] (an ``inference.Displacement``
        element) or a full-grid flow [D, H, W, 3] (pull, voxels); a 4x4 native voxel -> grid voxel
        map; the native shape; ``grid_shape``: the displacement's atlas grid (default: this
        atlas's); ``mask``: native voxels that may be labelled (None: all) -> label IDs
        [*native_shape] int32 (0 where no atlas label lands)."""
        if isinstance(displacement, np.ndarray) or tf.is_tensor(displacement):
            displacement = [(displacement, 1)]
        components = merged_components(displacement)
        grid_shape = tuple(int(s) for s in (grid_shape or self.atlas_shape))
        native_shape = tuple(int(s) for s in native_shape)
        segmentation = np.zeros(int(np.prod(native_shape)), np.int32)
        if self.label_box is None:
            return segmentation.reshape(native_shape)
        reach = sum(float(tf.reduce_max(tf.abs(v))) * f for v, f in components) + 1.0
        points = native_points_in_reach(native_to_atlas_voxel, native_shape, self.label_box,
                                        reach, mask)
        for start in range(0, len(points[0]), POINTS_PER_CHUNK):
            flat_index = points[0][start:start + POINTS_PER_CHUNK]
            atlas_points = points[1][start:start + POINTS_PER_CHUNK]
            segmentation[flat_index] = self._labels(components, tf.constant(atlas_points),
                                                    grid_shape).numpy()
        return segmentation.reshape(native_shape)

    def _atlas_points(self, components, grid_points, grid_shape):
        """Where each grid point's label is read: the point moved by the displacement, then
        (for an atlas on a grid of its own) into this atlas's voxels; clipped to the volumes."""
        limit = tf.constant([s - 1 for s in grid_shape], tf.float32)
        on_grid = tf.clip_by_value(grid_points, 0.0, limit)
        displaced = on_grid + tf.add_n([inference.sample_displacement(values, factor, on_grid)
                                        for values, factor in components])
        displaced = tf.clip_by_value(displaced, 0.0, limit)
        if self.labels_from_grid is not None:
            matrix = self.labels_from_grid
            displaced = displaced @ tf.transpose(matrix[:3, :3]) + matrix[:3, 3]
            displaced = tf.clip_by_value(
                displaced, 0.0, tf.constant([s - 1 for s in self.atlas_shape], tf.float32))
        return displaced

    # No AutoGraph (no Python control flow on tensors here): tracing is a first scan's cost.
    @tf.function(reduce_retracing=True, autograph=False)
    def _labels(self, components, grid_points, grid_shape):
        points = self._atlas_points(components, grid_points, grid_shape)
        return inference.labels_at_points(self.atlas_labels, points[None], self.atlas_cells)[0]

    @tf.function(reduce_retracing=True, autograph=False)
    def _fractions(self, components, grid_points, grid_shape, label_ids):
        """[L, N]: the share of each of ``label_ids`` in the one-hot-linear vote at each point
        (the trilinear weights of the 8 neighbours that carry it)."""
        points = self._atlas_points(components, grid_points, grid_shape)
        indices, weights = inference.corners(points, self.atlas_shape)  # [N, 8]
        corner_labels = tf.gather(tf.reshape(self.atlas_labels, [-1]), indices)
        same = tf.cast(tf.equal(corner_labels[None], label_ids[:, None, None]), tf.float32)
        return tf.reduce_sum(same * weights[None], axis=-1)


def merged_components(components) -> tuple:
    """A displacement given as fields on several grids [(values [d, h, w, 3], factor)] summed into
    one field on the finest of them: a point then costs one trilinear sample, not one per field
    (the sampling, not the label vote, is most of a label pull's time). Coarser fields are
    upsampled linearly onto the finest grid first, which rounds their corners by at most a
    fraction of their second difference."""
    components = [(tf.convert_to_tensor(np.asarray(v, np.float32)), f) for v, f in components]
    if len(components) == 1:
        return tuple(components)
    factor = min(f for _, f in components)
    # The finest grid's extent: the smallest among its fields (G_F's is padded for the U-Net).
    shape = np.min([v.shape.as_list()[:3] for v, f in components if f == factor], axis=0).tolist()
    total = tf.add_n([inference.resample_displacement(values[None], f / factor, shape)[0]
                      for values, f in components])
    return ((total, factor),)


def pull_fused(pulls: list, displacement, native_to_grid: np.ndarray, native_shape, grid_shape,
               weights: np.ndarray = None, weights_factor: int = None,
               mask: np.ndarray = None, probabilities=None, votes: bool = False) -> tuple:
    """Several atlases' labels pulled onto ``native_shape`` voxels and fused (``fusion.fuse_labels``).

    ``pulls``: one ``NativeLabelPull`` per atlas; ``displacement``: an ``inference.Displacement``
    with one element per atlas; ``weights``: per-atlas weight maps [A, *grid] on a grid
    ``weights_factor`` times coarser than the atlas grid, sampled (trilinear) at each voxel's
    position on the atlas grid, or None (majority vote); ``mask`` as ``NativeLabelPull``;
    ``probabilities``: label IDs whose fused probability to return as well (the atlases' one-hot
    linear shares, averaged with their weights). Native voxels are done a chunk at a time, so
    memory is A labels and weights per voxel of a chunk, never per voxel of the scan.

    Returns (label IDs [*native_shape] int32, with ``probabilities`` their [L, *native_shape]
    uint8 probabilities x 255 else None, with ``votes`` what was fused else None: (flat native
    indices [N] of the voxels in reach, each atlas's label there [A, N] int32, its weight there
    [A, N] float32 or None for a majority vote), the prior of ``labelling.intensity_model``).
    """
    from ltnet_tf.registration import fusion

    native_shape = tuple(int(s) for s in native_shape)
    segmentation = np.zeros(int(np.prod(native_shape)), np.int32)
    wanted = None if probabilities is None else tf.constant(list(probabilities), tf.int32)
    shares = None if wanted is None else np.zeros((len(probabilities), segmentation.size), np.uint8)
    found = _Votes(len(pulls), weights is not None) if votes else None
    boxes = [p.label_box for p in pulls if p.label_box is not None]
    points = (np.zeros(0, np.int64), np.zeros((0, 3), np.float32))
    if boxes:
        box = (np.min([b[0] for b in boxes], 0), np.max([b[1] for b in boxes], 0))
        elements = [merged_components(displacement.element(k)) for k in range(len(pulls))]
        reach = max(sum(float(tf.reduce_max(tf.abs(v))) * f for v, f in element)
                    for element in elements) + 1.0
        points = native_points_in_reach(native_to_grid, native_shape, box, reach, mask)
    grid_shape = tuple(int(s) for s in grid_shape)
    weight_maps = None if weights is None else tf.constant(
        np.moveaxis(np.asarray(weights, np.float32), 0, -1))  # [*grid, A]
    for start in range(0, len(points[0]), POINTS_PER_CHUNK):
        flat_index = points[0][start:start + POINTS_PER_CHUNK]
        grid_points = tf.constant(points[1][start:start + POINTS_PER_CHUNK])
        candidates = np.stack([pull._labels(element, grid_points, grid_shape).numpy()
                               for pull, element in zip(pulls, elements)])
        chunk_weights = None
        if weight_maps is not None:
            chunk_weights = np.moveaxis(inference.sample_coarse(
                weight_maps, weights_factor, grid_points).numpy(), -1, 0)
        segmentation[flat_index] = fusion.fuse_labels(candidates, chunk_weights)
        if shares is not None:
            shares[:, flat_index] = _fused_shares(pulls, elements, grid_points, grid_shape,
                                                  wanted, chunk_weights)
        if found is not None:
            found.add(flat_index, candidates, chunk_weights)
    return (segmentation.reshape(native_shape),
            None if shares is None else shares.reshape(-1, *native_shape),
            None if found is None else found.arrays())


class _Votes:
    """What a fusion voted, chunk by chunk: voxel indices, each atlas's label and weight there."""

    def __init__(self, atlases: int, weighted: bool):
        self.atlases, self.weighted = atlases, weighted
        self.index, self.labels, self.weights = [], [], []

    def add(self, flat_index, candidates, weights) -> None:
        self.index.append(flat_index)
        self.labels.append(candidates)
        if self.weighted:
            self.weights.append(np.asarray(weights, np.float32))

    def arrays(self) -> tuple:
        if not self.index:
            return (np.zeros(0, np.int64), np.zeros((self.atlases, 0), np.int32),
                    np.zeros((self.atlases, 0), np.float32) if self.weighted else None)
        return (np.concatenate(self.index), np.concatenate(self.labels, 1),
                np.concatenate(self.weights, 1) if self.weighted else None)


def _fused_shares(pulls, elements, grid_points, grid_shape, wanted, weights) -> np.ndarray:
    """[L, N] uint8: each wanted label's one-hot-linear share, weighted over the atlases (x 255)."""
    fractions = np.stack([pull._fractions(element, grid_points, grid_shape, wanted).numpy()
                          for pull, element in zip(pulls, elements)])  # [A, L, N]
    if weights is None:
        fused = fractions.mean(axis=0)
    else:  # JLF weights may be negative: a probability is clipped to [0, 1]
        total = np.where(np.abs(weights.sum(0)) > 1e-12, weights.sum(0), 1.0)
        fused = np.einsum("aln,an->ln", fractions, weights) / total
    return np.rint(255 * np.clip(fused, 0.0, 1.0)).astype(np.uint8)


def native_points_in_reach(native_to_atlas_voxel, native_shape, label_box, reach, mask=None):
    """(flat native indices, their atlas-grid coordinates [N, 3] float32) of the native voxels that
    fall inside the atlas grid within ``reach`` voxels of a labelled atlas voxel (the others can
    only be background), and inside ``mask`` [*native_shape] bool when given (a skull-stripped
    scan's non-zero voxels: outside the brain no label belongs). Computed one native slab at a
    time to bound memory."""
    matrix = np.asarray(native_to_atlas_voxel, np.float64)
    low = np.asarray(label_box[0], np.float64) - reach
    high = np.asarray(label_box[1], np.float64) + reach
    j, k = np.meshgrid(np.arange(native_shape[1]), np.arange(native_shape[2]), indexing="ij")
    plane = np.stack([j.ravel(), k.ravel()], -1).astype(np.float64)
    plane_in_atlas = plane @ matrix[:3, 1:3].T + matrix[:3, 3]
    indices, coordinates = [], []
    for i in range(native_shape[0]):
        in_slab = None if mask is None else np.flatnonzero(mask[i])
        if in_slab is not None and not len(in_slab):
            continue
        q = plane_in_atlas + i * matrix[:3, 0] if in_slab is None else (
            plane_in_atlas[in_slab] + i * matrix[:3, 0])
        keep = np.all((q >= low) & (q <= high), axis=1)
        if keep.any():
            flat = np.flatnonzero(keep) if in_slab is None else in_slab[keep]
            indices.append(flat + i * len(plane))
            coordinates.append(q[keep].astype(np.float32))
    if not indices:
        return np.zeros(0, np.int64), np.zeros((0, 3), np.float32)
    return np.concatenate(indices), np.concatenate(coordinates)


def brain_mask(values: np.ndarray):
    """The voxels a skull-stripped scan keeps (non-zero), or None when it has no zero background
    (fewer than 5% zero voxels): labels are pulled only there."""
    mask = np.asarray(values) != 0
    return mask if mask.mean() < 0.95 else None


# ------------------------------------------------------------------------------ volumes
def structure_volumes_mm3(segmentation: np.ndarray, affine: np.ndarray, label_ids) -> dict:
    """{label ID: volume in mm³} on the segmentation's own grid (voxel count x voxel volume)."""
    voxel_mm3 = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3])))
    values = np.asarray(segmentation).ravel()
    values = values[values != 0]  # most voxels are background: counted once, not sorted
    ids, counts = np.unique(values, return_counts=True)
    found = dict(zip(ids.tolist(), counts.tolist()))
    return {int(label): found.get(int(label), 0) * voxel_mm3 for label in label_ids
            if int(label) != 0}
