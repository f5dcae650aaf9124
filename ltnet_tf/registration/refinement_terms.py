"""What a test-time refinement step computes, written for speed (``refinement`` runs them):

- NCC window sums are banded matrix products along each axis (``WindowSums``): the n-voxel box sum
  along an axis of length L is a product with an L×L band matrix, which is what a CPU does fastest,
  and it needs neither the transposes nor the 1-channel 3D convolutions of ``losses.LocalNCC``. The
  scan's own sums are computed once per scan, so a step sums 3 volumes instead of 5. Same loss as
  ``losses.LocalNCC`` (tests/test_refinement.py checks it).
- The atlas is sampled through a table of each cell's 8 corner values (one gather per point instead
  of eight); same values as ``inference.warp_image``.
- The smoothness term without transposes; the grids of the refinement (``to_grid``).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import itertools
import math

import numpy as np
import tensorflow as tf

from ltnet_tf.io import volumes as data


def _band(size: int, window: int) -> tf.Tensor:
    """[size, size] 0/1 matrix: row i sums the ``window`` voxels centred on i (zero beyond the ends)."""
    index = np.arange(size)
    return tf.constant((np.abs(index[:, None] - index[None]) <= window // 2).astype(np.float32))


class WindowSums:
    """Sum over the n³ window around each voxel (zero padding), as ``losses.LocalNCC`` takes it.

    Volumes are [N, D, H, W] (no channel axis), so each axis's box sum is one matrix product with
    no transpose: W as [N·D·H, W] @ band, H and D as band @ [.., H, W] and band @ [N, D, H·W].
    """

    def __init__(self, shape, window: int):
        self.shape = tuple(int(s) for s in shape)
        self.bands = [_band(size, window) for size in self.shape]

    def __call__(self, volumes: tf.Tensor) -> tf.Tensor:
        depth, height, width = self.shape
        band_d, band_h, band_w = self.bands
        count = tf.shape(volumes)[0]
        sums = tf.matmul(tf.reshape(volumes, [-1, width]), band_w)  # band is symmetric
        sums = tf.matmul(band_h, tf.reshape(sums, [count * depth, height, width]))
        sums = tf.matmul(band_d, tf.reshape(sums, [count, depth, height * width]))
        return tf.reshape(sums, [count, depth, height, width])


class FixedScanNCC:
    """1 - local NCC (Eq. 1 of the supplementary, ``losses.LocalNCC``) against one fixed scan.

    ``scan_sums`` is computed once per scan; ``__call__`` then needs the window sums of the moving
    image only (3 volumes per step instead of 5). Same formula and eps as ``losses.LocalNCC``.
    """

    def __init__(self, shape, window: int = 9, eps: float = 1e-5):
        self.window_sums = WindowSums(shape, window)
        self.window_size = float(window ** 3)
        self.eps = eps

    def scan_sums(self, scan: tf.Tensor) -> tuple:
        """scan [B, D, H, W] -> (scan, its window sum, window sum of its square)."""
        count = tf.shape(scan)[0]
        sums = self.window_sums(tf.concat([scan, scan * scan], 0))
        return scan, sums[:count], sums[count:]

    def __call__(self, scan_sums: tuple, moved: tf.Tensor) -> tf.Tensor:
        """moved [B, D, H, W] -> [B] loss."""
        target, t_sum, t2_sum = scan_sums
        count = tf.shape(moved)[0]
        sums = self.window_sums(tf.concat([moved, moved * moved, target * moved], 0))
        m_sum, m2_sum, tm_sum = sums[:count], sums[count:2 * count], sums[2 * count:]
        window_size = self.window_size
        t_mean, m_mean = t_sum / window_size, m_sum / window_size
        cross = tm_sum - m_mean * t_sum - t_mean * m_sum + t_mean * m_mean * window_size
        t_var = tf.maximum(t2_sum - 2 * t_mean * t_sum + t_mean * t_mean * window_size, 0.0)
        m_var = tf.maximum(m2_sum - 2 * m_mean * m_sum + m_mean * m_mean * window_size, 0.0)
        correlation = cross * cross / (t_var * m_var + self.eps)
        return 1.0 - tf.reduce_mean(tf.reshape(correlation, [count, -1]), axis=-1)


def smoothness(displacement: tf.Tensor, for_xla: bool = True) -> tf.Tensor:
    """L_smooth as ``losses.smoothness`` (VoxelMorph's Grad('l2')), without its transposes.

    The forward differences are slices (``for_xla``: XLA fuses them, 5x faster than the
    transposes) or gathers (without XLA, where TensorFlow's strided-slice gradient is as slow as
    the transposes and a gather's is 5x faster).
    """
    count = tf.shape(displacement)[0]
    if for_xla:
        differences = (displacement[:, 1:] - displacement[:, :-1],
                       displacement[:, :, 1:] - displacement[:, :, :-1],
                       displacement[:, :, :, 1:] - displacement[:, :, :, :-1])
    else:
        size = displacement.shape
        differences = [tf.gather(displacement, tf.range(1, size[axis]), axis=axis)
                       - tf.gather(displacement, tf.range(size[axis] - 1), axis=axis)
                       for axis in (1, 2, 3)]
    terms = [tf.reduce_mean(tf.reshape(tf.square(d), [count, -1]), axis=-1) for d in differences]
    return tf.add_n(terms) / 3.0


class AtlasSampler:
    """Trilinear pull-warping of fixed images [A, D, H, W] (A atlases), as ``inference.warp_image``.

    Each voxel's cell (itself and its 7 upper neighbours, the last voxel repeated at the far edges)
    is stored as one row of 8 values, so sampling a point is a single gather of its lower corner's
    row. Points are clipped to the volume (VoxelMorph's ``fill_value=None``). A flow batch of B
    displacements is pulled through atlas b when A == B, through the one atlas when A == 1.
    """

    def __init__(self, images):
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape.rank == 3:
            images = images[None]
        self.count = int(images.shape[0])
        self.shape = tuple(images.shape.as_list()[1:])
        depth, height, width = self.shape
        padded = tf.pad(images, [[0, 0]] + [[0, 1]] * 3, mode="SYMMETRIC")  # repeats the last voxel
        corners = [padded[:, dz:dz + depth, dy:dy + height, dx:dx + width]
                   for dz, dy, dx in itertools.product((0, 1), repeat=3)]
        self.cells = tf.reshape(tf.stack(corners, -1), [self.count, -1, 8])
        self.grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in self.shape],
                                         indexing="ij"), -1)
        self.last = tf.constant([s - 1 for s in self.shape], tf.float32)

    def __call__(self, flow: tf.Tensor) -> tf.Tensor:
        """flow [B, D, H, W, 3] (voxels) -> images pulled by it, [B, D, H, W]."""
        points = tf.clip_by_value(self.grid[None] + flow, 0.0, self.last)
        lower = tf.floor(points)
        fz, fy, fx = tf.unstack(points - lower, axis=-1)
        z, y, x = tf.unstack(tf.cast(lower, tf.int32), axis=-1)
        index = (z * self.shape[1] + y) * self.shape[2] + x
        if self.count == 1:
            cell = tf.gather(self.cells[0], index)
        else:
            cell = tf.gather(self.cells, index, batch_dims=1)
        c = tf.unstack(cell, axis=-1)  # corner (dz, dy, dx) is c[4 dz + 2 dy + dx]
        along_x = [c[i] + fx * (c[i + 1] - c[i]) for i in (0, 2, 4, 6)]
        along_y = [along_x[i] + fy * (along_x[i + 1] - along_x[i]) for i in (0, 2)]
        return along_y[0] + fz * (along_y[1] - along_y[0])


# ------------------------------------------------------------------------------- grids
def to_grid(volume: tf.Tensor, factor: int) -> tf.Tensor:
    """[B, D, H, W, 1] full grid -> [B, ⌈D/f⌉, ⌈H/f⌉, ⌈W/f⌉] by zero padding and average pooling."""
    shape = volume.shape[1:4].as_list()
    padded = data.pad_to_shape(volume, [int(math.ceil(s / factor)) * factor for s in shape])
    if factor > 1:
        padded = tf.nn.avg_pool3d(padded, ksize=factor, strides=factor, padding="VALID")
    return padded[..., 0]
