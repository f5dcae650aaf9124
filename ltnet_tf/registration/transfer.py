"""Label transfer: scan -> segmentation, in TensorFlow ops only.

``LabelTransfer`` is the single implementation of inference. ``predict.py`` runs it in-process or
from the SavedModel that ``ltnet_tf.serving.export`` writes from it, so what a user tests locally is what TF
Serving runs.

Why warp one-hot labels linearly, then take the argmax, rather than warping the label map with
nearest-neighbour interpolation: nearest-neighbour picks whichever of the 8 surrounding atlas voxels
is closest, so boundaries move in whole-voxel steps and thin structures break up; linear
interpolation of the one-hot map lets each of the 8 neighbours vote with its trilinear weight, which
gives smooth, sub-voxel boundaries (and the same result as warping each label's indicator and taking
the most likely label). We compute exactly that vote without materialising the one-hot map: a label's
interpolated value is the sum of the weights of the neighbours that carry it, so the argmax is the
label of the neighbour whose label collects the most weight. Memory is independent of the number
of labels (a full one-hot atlas of 40 labels at 160×192×224 would need 1.1 GB per copy).

The vote is only needed where the 8 neighbours disagree. For each atlas cell we precompute the label
its 8 corners share (or a mark that they differ); a sampling point in a uniform cell takes that label
with one gather, and the vote runs on the rest (11% of the benchmark atlas's cells): 0.85 s instead
of 3.4 s per 160×192×224 scan on 2 CPU cores, measured side by side (bench.speed at 07f69df).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import itertools

import numpy as np
import tensorflow as tf

from ltnet_tf.config import LTNetConfig
from ltnet_tf.io import volumes as data


def resize_axis(volume: tf.Tensor, axis: int, factor: float, size: int) -> tf.Tensor:
    """Linear resampling along one axis, voxel centres aligned with average-pool downsampling.

    Target voxel i lies at source coordinate (i + 0.5) / factor - 0.5; beyond the first and last
    source voxel the edge value is kept.
    """
    in_size = volume.shape[axis]
    coords = (tf.range(size, dtype=tf.float32) + 0.5) / factor - 0.5
    coords = tf.clip_by_value(coords, 0.0, in_size - 1.0)
    lower = tf.floor(coords)
    weight = coords - lower
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, in_size - 1)
    shape = [1] * len(volume.shape)
    shape[axis] = size
    weight = tf.reshape(weight, shape)
    return (tf.gather(volume, lower, axis=axis) * (1.0 - weight)
            + tf.gather(volume, upper, axis=axis) * weight)


def resample_displacement(flow: tf.Tensor, ratio: float, shape) -> tf.Tensor:
    """A displacement [B, d, h, w, 3] on a grid ``ratio`` times coarser than the target grid ->
    [B, *shape, 3] on the target grid, linearly, voxel centres aligned as average pooling places
    them, values rescaled to target voxels. ``ratio`` may be < 1 (target coarser); ratio 1 crops.

    E.g. G_F's working-grid displacement to the atlas grid: ``ratio = config.downsample``.
    """
    if ratio == 1:
        return flow[:, :shape[0], :shape[1], :shape[2], :]
    for axis, size in enumerate(shape, start=1):
        flow = resize_axis(flow, axis, ratio, size)
    return flow * float(ratio)


class Displacement:
    """A displacement on the atlas grid (VoxelMorph's pull convention, full voxels) given as a sum
    of fields on coarser grids, as refinement leaves it: ``components`` [(values [B, d, h, w, 3]
    in that grid's voxels, grid factor)], e.g. G_F's working-grid displacement plus a correction at
    half resolution. It equals the sum of ``resample_displacement`` of each component; the whole
    atlas-grid field (82 MB for 160×192×224) is built only by ``full_grid``, while ``at_points``
    samples it where a label pull needs it.
    """

    def __init__(self, components):
        self.components = [(tf.convert_to_tensor(values, tf.float32), factor)
                           for values, factor in components]

    def full_grid(self, shape, count=None) -> tf.Tensor:
        """[B, *shape, 3] on the atlas grid (``count``: B, needed when there is no component)."""
        if not self.components:
            return tf.zeros(tf.concat([[count], shape, [3]], 0), tf.float32)
        return tf.add_n([resample_displacement(values, factor, shape)
                         for values, factor in self.components])

    def element(self, index: int) -> list:
        """Batch element ``index``'s components [(values [d, h, w, 3], factor)]."""
        return [(values[index], factor) for values, factor in self.components]


def sample_coarse(values: tf.Tensor, factor, points: tf.Tensor) -> tf.Tensor:
    """Trilinear samples of ``values`` [d, h, w, C], on a grid ``factor`` times coarser than the
    atlas grid, at atlas-grid voxel coordinates ``points`` [..., 3] -> [..., C]: at
    (p + 0.5) / factor - 0.5 (voxel centres as average pooling places them), clipped to the grid,
    which is where ``resample_displacement``'s linear upsampling reads them."""
    size = tf.constant([s - 1 for s in values.shape.as_list()[:3]], tf.float32)
    coordinates = points if factor == 1 else (points + 0.5) / float(factor) - 0.5
    return sample_linear(values, tf.clip_by_value(coordinates, 0.0, size))


def sample_displacement(values: tf.Tensor, factor, points: tf.Tensor) -> tf.Tensor:
    """A displacement ``values`` [d, h, w, 3] on a grid ``factor`` times coarser than the atlas
    grid (in its voxels), at atlas-grid voxel coordinates ``points`` [..., 3] -> [..., 3] full
    voxels: what ``resample_displacement`` gives at the atlas voxels."""
    return sample_coarse(values, factor, points) * float(factor)


def _sampling_points(flow: tf.Tensor, shape) -> tf.Tensor:
    """Where pull-warping by ``flow`` [B, D, H, W, 3] samples: [B, N, 3] voxel coordinates.

    Points are clipped to the volume, which is VoxelMorph's ``fill_value=None`` behaviour.
    """
    grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in shape], indexing="ij"), -1)
    points = tf.reshape(grid[None] + flow, [tf.shape(flow)[0], -1, 3])
    return tf.clip_by_value(points, 0.0, tf.constant([s - 1 for s in shape], tf.float32))


def flat_index(coordinates, shape):
    """Integer voxel coordinates [..., 3] (or a list of 3 tensors) -> flat index into ``shape``."""
    z, y, x = tf.unstack(coordinates, axis=-1) if not isinstance(coordinates, list) else coordinates
    return (z * shape[1] + y) * shape[2] + x


def corners(points: tf.Tensor, shape):
    """Sampling points [..., 3] -> their 8 neighbours' flat indices [..., 8] and weights [..., 8]."""
    lower = tf.floor(points)
    fraction = points - lower
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, tf.constant([s - 1 for s in shape], tf.int32))
    indices, weights = [], []
    for corner in itertools.product((0, 1), repeat=3):
        coordinates, weight = [], 1.0
        for axis, use_upper in enumerate(corner):
            coordinates.append(upper[..., axis] if use_upper else lower[..., axis])
            weight = weight * (fraction[..., axis] if use_upper else 1.0 - fraction[..., axis])
        indices.append(flat_index(coordinates, shape))
        weights.append(weight)
    return tf.stack(indices, -1), tf.stack(weights, -1)


# Marks a cell whose 8 corners do not all carry one label. An atlas that uses this very ID as a
# label is still warped correctly: its uniform cells merely go through the vote as well.
MIXED_CELL = np.iinfo(np.int32).min


def uniform_cell_labels(label_map: tf.Tensor) -> tf.Tensor:
    """[D, H, W] label IDs -> for the cell whose lower corner is each voxel, the label its 8 corners
    share, or ``MIXED_CELL``. Corners past the last voxel are clipped to it, as in sampling."""
    label_map = tf.convert_to_tensor(label_map, tf.int32)
    depth, height, width = label_map.shape.as_list()
    padded = tf.pad(label_map, [[0, 1]] * 3, mode="SYMMETRIC")  # repeats the last voxel
    uniform = None
    for dz, dy, dx in itertools.product((0, 1), repeat=3):
        same = tf.equal(padded[dz:dz + depth, dy:dy + height, dx:dx + width], label_map)
        uniform = same if uniform is None else tf.logical_and(uniform, same)
    return tf.where(uniform, label_map, tf.fill(tf.shape(label_map), MIXED_CELL))


def warp_labels(label_map: tf.Tensor, flow: tf.Tensor, cell_labels=None) -> tf.Tensor:
    """Label map [D, H, W] (any integer IDs) pulled by ``flow`` [B, D, H, W, 3] -> [B, D, H, W].

    Equal to one-hot linear warping followed by argmax (see the module docstring). ``cell_labels``:
    ``uniform_cell_labels(label_map)``, when the caller keeps it (it depends only on the atlas).
    """
    label_map = tf.convert_to_tensor(label_map, tf.int32)
    shape = label_map.shape.as_list()
    labels = labels_at_points(label_map, _sampling_points(flow, shape), cell_labels)
    return tf.reshape(labels, [-1, *shape])


def labels_at_points(label_map: tf.Tensor, points: tf.Tensor, cell_labels=None) -> tf.Tensor:
    """The one-hot-linear-then-argmax label of ``label_map`` [D, H, W] at voxel coordinates
    ``points`` [B, N, 3] (already inside the volume) -> [B, N]."""
    label_map = tf.convert_to_tensor(label_map, tf.int32)
    shape = label_map.shape.as_list()
    if cell_labels is None:
        cell_labels = uniform_cell_labels(label_map)
    lower_index = flat_index(tf.cast(tf.floor(points), tf.int32), shape)
    # Most points fall in a cell whose 8 corners carry one label: that label is the answer.
    labels = tf.gather(tf.reshape(cell_labels, [-1]), lower_index)  # [B, N]
    # The vote, only where the corners disagree (11% of the benchmark atlas's cells).
    mixed = tf.where(tf.equal(labels, MIXED_CELL))  # [M, 2]
    indices, weights = corners(tf.gather_nd(points, mixed), shape)  # [M, 8]
    corner_labels = tf.gather(tf.reshape(label_map, [-1]), indices)
    candidates, corner_weights = tf.unstack(corner_labels, axis=-1), tf.unstack(weights, axis=-1)
    votes = list(corner_weights)
    for i, j in itertools.combinations(range(8), 2):  # each pair of corners compared once
        same = tf.cast(tf.equal(candidates[i], candidates[j]), tf.float32)
        votes[i] += corner_weights[j] * same
        votes[j] += corner_weights[i] * same
    winner = tf.argmax(tf.stack(votes, -1), axis=-1, output_type=tf.int32)
    winners = tf.gather(corner_labels, winner[:, None], batch_dims=1)[:, 0]
    return tf.tensor_scatter_nd_update(labels, mixed, winners)


def sample_linear(volume: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """Trilinear samples of ``volume`` [D, H, W, C] at ``points`` [..., 3] (inside it) -> [..., C]."""
    shape = volume.shape.as_list()[:3]
    indices, weights = corners(points, shape)  # [..., 8]
    values = tf.gather(tf.reshape(volume, [-1, volume.shape[-1]]), indices)  # [..., 8, C]
    return tf.reduce_sum(values * tf.cast(weights, values.dtype)[..., None], axis=-2)


def warp_image(image: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Image [D, H, W] pulled by ``flow`` [B, D, H, W, 3] with trilinear interpolation -> [B, D, H, W, 1]."""
    image = tf.cast(image, tf.float32)
    shape = image.shape.as_list()
    return tf.reshape(sample_linear(image[..., None], _sampling_points(flow, shape)),
                      [-1, *shape, 1])




class LabelTransfer(tf.Module):
    """Atlas + G_F -> a function from scans on the atlas grid to segmentations on that grid.

    ``atlas_image`` [D, H, W] (raw intensities) and ``atlas_labels`` [D, H, W] (label IDs) are held as
    constants, so the exported signature needs only the scan.
    """

    def __init__(self, forward_generator: tf.keras.Model, config: LTNetConfig,
                 atlas_image: np.ndarray, atlas_labels: np.ndarray, name: str = "label_transfer"):
        super().__init__(name=name)
        if tuple(atlas_image.shape) != tuple(config.atlas_shape):
            raise ValueError(f"atlas shape {atlas_image.shape} != config atlas_shape "
                             f"{config.atlas_shape}")
        self.config = config
        self.forward_generator = forward_generator
        self.full_shape = tuple(int(s) for s in config.atlas_shape)
        atlas_normalized = data.normalize_intensity(
            tf.constant(atlas_image[None, ..., None], tf.float32))
        self.atlas_full = tf.constant(atlas_normalized[0, ..., 0])
        self.atlas_working = tf.constant(data.to_working_grid(atlas_normalized, config))
        self.atlas_labels = tf.constant(atlas_labels.astype(np.int32))
        self.atlas_cells = tf.constant(uniform_cell_labels(self.atlas_labels))

    def transfer(self, scan: tf.Tensor, refinement=None) -> dict:
        """scan [B, D, H, W, 1] -> segmentation [B, D, H, W] int32, flow, warped_atlas.

        ``refinement``: a ``ltnet_tf.registration.refinement.Refinement`` of this atlas
        (``Refinement.for_label_transfer(self, ...)``) that optimises G_F's displacement for each
        scan before the labels are warped; None warps with G_F's displacement as it is.
        """
        return self._transfer(scan, self.atlas_full, self.atlas_working, self.atlas_labels,
                              self.atlas_cells, refinement=refinement)

    def segment(self, scan: tf.Tensor, refinement=None) -> dict:
        """As ``transfer``, segmentation only: skips warping the atlas image (~6% of the time)."""
        return self._transfer(scan, self.atlas_full, self.atlas_working, self.atlas_labels,
                              self.atlas_cells, extras=False, refinement=refinement)

    def transfer_with_atlas(self, atlas_image: tf.Tensor, atlas_labels: tf.Tensor,
                            scan: tf.Tensor) -> dict:
        """As ``transfer``, with another atlas [D, H, W] and its label IDs [D, H, W] on the same grid."""
        atlas_normalized = data.normalize_intensity(tf.cast(atlas_image, tf.float32)[None, ..., None])
        atlas_labels = tf.cast(atlas_labels, tf.int32)
        return self._transfer(scan, atlas_normalized[0, ..., 0],
                              data.to_working_grid(atlas_normalized, self.config), atlas_labels,
                              uniform_cell_labels(atlas_labels))

    def displacement(self, scan: tf.Tensor) -> dict:
        """scan [B, D, H, W, 1] -> ``flow_working``: G_F's displacement on its working grid
        [B, *working_shape, 3] (working voxels), before anything is put on the full grid."""
        return {"flow_working": self._working_flow(data.normalize_intensity(
            tf.cast(scan, tf.float32)), self.atlas_working)}

    def _working_flow(self, scan_normalized, atlas_working):
        scan_working = data.to_working_grid(scan_normalized, self.config)
        atlas = tf.repeat(atlas_working, tf.shape(scan_normalized)[0], axis=0)
        _, flow_working = self.forward_generator([atlas, scan_working], training=False)
        return tf.cast(flow_working, tf.float32)

    def _transfer(self, scan, atlas_full, atlas_working, atlas_labels, atlas_cells,
                  extras=True, refinement=None) -> dict:
        scan_normalized = data.normalize_intensity(tf.cast(scan, tf.float32))
        flow_working = self._working_flow(scan_normalized, atlas_working)
        if refinement is None:
            flow = resample_displacement(flow_working, self.config.downsample, self.full_shape)
        else:
            flow = refinement(scan_normalized, flow_working, full_grid=True)["flow"]
        segmentation = warp_labels(atlas_labels, flow, atlas_cells)
        if not extras:
            return {"segmentation": segmentation}
        return {
            "segmentation": segmentation,
            "flow": flow,
            "warped_atlas": warp_image(atlas_full, flow),
        }

    @tf.function
    def __call__(self, scan):
        return self.transfer(scan)
