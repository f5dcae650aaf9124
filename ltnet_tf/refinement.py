"""Test-time refinement (instance optimisation) of G_F's displacement, one scan at a time.

G_F predicts Δp_F on its working grid (``config.downsample`` times coarser than the atlas). Starting
from it, Adam minimises the training objective of G_F for this one scan,

    L = (1 - local NCC(u, x∘Δp)) + weight_smooth · L_smooth(Δp)          (same terms as training)

directly over the displacement: first on the network's working grid (cheap), then on a grid
``factor`` times coarser than the atlas (2: half resolution, finer than the network's quarter).
The result is put back on the atlas grid in full voxels (VoxelMorph's pull convention), so labels
are transferred as without refinement (``inference.warp_labels``).

What a step costs decides whether refinement is worth it, so a step is one traced loop of plain ops:

- NCC window sums are banded matrix products along each axis (``WindowSums``): the n-voxel box sum
  along an axis of length L is a product with an L×L band matrix, which is what a CPU does fastest,
  and it needs neither the transposes nor the 1-channel 3D convolutions of ``losses.LocalNCC``. The
  scan's own sums are computed once per scan, so a step sums 3 volumes instead of 5. Same loss as
  ``losses.LocalNCC`` (tests/test_refinement.py checks it).
- The atlas is sampled through a table of each cell's 8 corner values (one gather per point instead
  of eight); same values as ``inference.warp_image``.
- Adam is written out on the displacement (no Keras optimiser, model or variable).

Measured at 80×96×112 on 2 CPU cores: see bench/results/refinement.md.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import itertools
import math

import numpy as np
import tensorflow as tf

from ltnet_tf import data
from ltnet_tf.config import LTNetConfig, RefinementSettings
from ltnet_tf.inference import resample_displacement


# ------------------------------------------------------------------------------- the loss terms
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
    """Trilinear pull-warping of one fixed image [D, H, W], as ``inference.warp_image``.

    Each voxel's cell (itself and its 7 upper neighbours, the last voxel repeated at the far edges)
    is stored as one row of 8 values, so sampling a point is a single gather of its lower corner's
    row. Points are clipped to the volume (VoxelMorph's ``fill_value=None``).
    """

    def __init__(self, image):
        image = tf.convert_to_tensor(image, tf.float32)
        self.shape = tuple(image.shape.as_list())
        depth, height, width = self.shape
        padded = tf.pad(image, [[0, 1]] * 3, mode="SYMMETRIC")  # repeats the last voxel
        corners = [padded[dz:dz + depth, dy:dy + height, dx:dx + width]
                   for dz, dy, dx in itertools.product((0, 1), repeat=3)]
        self.cells = tf.reshape(tf.stack(corners, -1), [-1, 8])
        self.grid = tf.stack(tf.meshgrid(*[tf.range(s, dtype=tf.float32) for s in self.shape],
                                         indexing="ij"), -1)
        self.last = tf.constant([s - 1 for s in self.shape], tf.float32)

    def __call__(self, flow: tf.Tensor) -> tf.Tensor:
        """flow [B, D, H, W, 3] (voxels) -> image pulled by it, [B, D, H, W]."""
        points = tf.clip_by_value(self.grid[None] + flow, 0.0, self.last)
        lower = tf.floor(points)
        fz, fy, fx = tf.unstack(points - lower, axis=-1)
        z, y, x = tf.unstack(tf.cast(lower, tf.int32), axis=-1)
        cell = tf.gather(self.cells, (z * self.shape[1] + y) * self.shape[2] + x)
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


# ------------------------------------------------------------------------------- the optimiser
class GridStage:
    """Adam on a correction of the displacement at one grid (the atlas grid shrunk ``factor``
    times): the atlas there, its loss, and the traced loop."""

    def __init__(self, atlas_full: tf.Tensor, factor: int, window: int, learning_rate: float,
                 weight_smooth: float, jit_compile: bool):
        self.factor = factor
        self.grid_shape = tuple(int(math.ceil(s / factor)) for s in atlas_full.shape.as_list())
        self.atlas_sampler = AtlasSampler(to_grid(atlas_full[None, ..., None], factor)[0])
        self.ncc = FixedScanNCC(self.grid_shape, window)
        self.learning_rate = learning_rate
        self.weight_smooth = weight_smooth
        self.jit_compile = jit_compile
        self.optimise = tf.function(self._optimise)
        # XLA fuses the loss's elementwise chains and slices; compiling the whole loop was no
        # faster than compiling the step (bench/results/refinement.md).
        self._loss_and_gradient = tf.function(self._loss_and_gradient_eager,
                                              jit_compile=jit_compile)

    def loss(self, scan_sums: tuple, flow: tf.Tensor) -> tf.Tensor:
        """[B] training objective of displacement ``flow`` on this grid."""
        warped_atlas = self.atlas_sampler(flow)
        return (self.ncc(scan_sums, warped_atlas)
                + self.weight_smooth * smoothness(flow, for_xla=self.jit_compile))

    def _loss_and_gradient_eager(self, scan_sums, flow_start, correction):
        """One step's [B] loss and its gradient with respect to the correction."""
        with tf.GradientTape() as tape:
            tape.watch(correction)
            loss = self.loss(scan_sums, flow_start + correction)
            total = tf.reduce_sum(loss)  # scans are independent: each gets its own gradient
        return loss, tape.gradient(total, correction)

    def _optimise(self, scan_sums, flow_start, steps):
        """Adam (β 0.9/0.999, ε 1e-7 as Keras) from a zero correction; returns the correction."""
        beta_1, beta_2, epsilon = 0.9, 0.999, 1e-7

        def step(i, correction, first, second):
            _, gradient = self._loss_and_gradient(scan_sums, flow_start, correction)
            first = beta_1 * first + (1.0 - beta_1) * gradient
            second = beta_2 * second + (1.0 - beta_2) * tf.square(gradient)
            t = tf.cast(i + 1, tf.float32)
            rate = self.learning_rate * tf.sqrt(1.0 - beta_2 ** t) / (1.0 - beta_1 ** t)
            return i + 1, correction - rate * first / (tf.sqrt(second) + epsilon), first, second

        correction, first, second = (tf.zeros_like(flow_start) for _ in range(3))
        _, correction, _, _ = tf.while_loop(lambda i, *_: i < steps, step,
                                            (tf.constant(0), correction, first, second))
        return correction


class Refinement(tf.Module):
    """Adam on one scan's displacement, started at G_F's, on the training objective.

    ``__call__(scan_normalized [B, D, H, W, 1], flow_working [B, *working, 3])`` ->
    ``{"flow": [B, D, H, W, 3] full-grid displacement in full voxels, "loss": [B] objective of the
    returned displacement, "loss_start": [B] objective of G_F's}``, both losses on the grid of
    ``factor``.

    Coarse to fine: ``coarse_steps`` steps at grid factor ``coarse_factor`` (default: the
    network's working grid, where a step costs ~10x less) first, then ``steps`` at ``factor``.
    What is optimised at each grid is a correction added to G_F's displacement, so the result is
    G_F's displacement exactly as ``inference.resample_displacement`` puts it on the full grid
    plus the upsampled corrections: 0 steps changes nothing.

    ``settings``: a ``config.RefinementSettings`` (default: its measured defaults); keyword
    ``options`` override its fields (steps, factor, learning_rate, weight_smooth, coarse_steps,
    coarse_factor, jit_compile). Raises ConfigError (a ValueError) for invalid settings.
    """

    def __init__(self, config: LTNetConfig, atlas_image_normalized_full,
                 settings: RefinementSettings = None, name: str = "refinement", **options):
        super().__init__(name=name)
        settings = (settings or RefinementSettings()).replace(**options)
        coarse_factor = (config.downsample if settings.coarse_factor is None
                         else settings.coarse_factor)
        atlas = tf.convert_to_tensor(atlas_image_normalized_full, tf.float32)
        self.config = config
        self.full_shape = tuple(atlas.shape.as_list())
        self.factor = settings.factor
        self.steps = settings.steps
        self.learning_rate = float(settings.learning_rate)
        self.weight_smooth = float(settings.weight_smooth)
        self.jit_compile = bool(settings.jit_compile)
        stage = lambda f: GridStage(atlas, f, config.ncc_window, self.learning_rate,  # noqa: E731
                                    self.weight_smooth, self.jit_compile)
        self.fine = stage(self.factor)
        self.grid_shape = self.fine.grid_shape
        # A coarse stage only where it is coarser than the fine grid.
        self.coarse = stage(coarse_factor) if coarse_factor > self.factor else None
        self.coarse_factor = coarse_factor if self.coarse else None
        self.coarse_steps = settings.coarse_steps if self.coarse else 0

    def __call__(self, scan_normalized: tf.Tensor, flow_working: tf.Tensor, steps=None,
                 coarse_steps=None) -> dict:
        """See the class docstring; ``steps``, ``coarse_steps`` override the constructor's
        (tensors are fine)."""
        steps = tf.convert_to_tensor(self.steps if steps is None else steps, tf.int32)
        coarse_steps = tf.convert_to_tensor(
            self.coarse_steps if coarse_steps is None else coarse_steps, tf.int32)
        flow_working = tf.cast(flow_working, tf.float32)
        scan_normalized = tf.cast(scan_normalized, tf.float32)
        working = self.config.downsample
        flow = resample_displacement(flow_working, self.config.downsample, self.full_shape)
        fine_start = resample_displacement(flow_working, working / self.factor, self.grid_shape)
        if self.coarse is not None:
            coarse = self.coarse
            scan_sums = coarse.ncc.scan_sums(to_grid(scan_normalized, coarse.factor))
            correction = coarse.optimise(
                scan_sums, resample_displacement(flow_working, working / coarse.factor,
                                                 coarse.grid_shape), coarse_steps)
            ratio = coarse.factor / self.factor
            fine_start += resample_displacement(correction, ratio, self.grid_shape)
            flow += resample_displacement(correction, coarse.factor, self.full_shape)
        scan_sums = self.fine.ncc.scan_sums(to_grid(scan_normalized, self.factor))
        correction = self.fine.optimise(scan_sums, fine_start, steps)
        flow += resample_displacement(correction, self.factor, self.full_shape)
        g_f_start = resample_displacement(flow_working, working / self.factor, self.grid_shape)
        return {"flow": flow, "loss": self.fine.loss(scan_sums, fine_start + correction),
                "loss_start": self.fine.loss(scan_sums, g_f_start)}

    @classmethod
    def for_label_transfer(cls, label_transfer, settings: RefinementSettings = None,
                           **options) -> "Refinement":
        """The refinement of ``label_transfer``'s G_F: its config and atlas; ``settings`` and
        ``options`` as ``__init__``."""
        return cls(label_transfer.config, label_transfer.atlas_full, settings, **options)


# ------------------------------------------------------------------------------- predict.py
class ScanRefiner:
    """Refinement as ``predict.py`` runs it, for one aligned scan (a ``data.Volume`` on the atlas
    grid) and G_F's displacement as ``Predictor.working_displacement`` returns it."""

    def __init__(self, config: LTNetConfig, atlas_image, settings: RefinementSettings = None):
        self.config = config
        atlas = data.normalize_intensity(
            tf.constant(np.asarray(atlas_image, np.float32)[None, ..., None]))
        self.refinement = Refinement(config, atlas[0, ..., 0], settings)

    def settings(self) -> dict:
        r = self.refinement
        return {"steps": r.steps, "factor": r.factor, "grid": list(r.grid_shape),
                "coarse_steps": r.coarse_steps, "coarse_factor": r.coarse_factor,
                "learning_rate": r.learning_rate, "weight_smooth": r.weight_smooth,
                "jit_compile": r.jit_compile}

    def __call__(self, scan, flow_working: np.ndarray) -> np.ndarray:
        """Aligned scan, G_F's working-grid displacement [*working, 3] -> the refined one on the
        atlas grid [D, H, W, 3] (full voxels)."""
        scan_normalized = data.normalize_intensity(
            tf.constant(np.asarray(scan.data, np.float32)[None, ..., None]))
        return self.refinement(scan_normalized, flow_working[None])["flow"][0].numpy()
