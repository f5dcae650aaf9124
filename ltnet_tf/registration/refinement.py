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

from ltnet_tf.config import LTNetConfig, RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.registration.gradient_fields import FixedScanNGF
from ltnet_tf.registration.transfer import Displacement, resample_displacement


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


# ------------------------------------------------------------------------------- the optimiser
class GridStage:
    """Adam on a correction of the displacement at one grid (the atlas grid shrunk ``factor``
    times): the atlases there, the loss, and the traced loop."""

    def __init__(self, atlases_full: tf.Tensor, factor: int, window: int, learning_rate: float,
                 weight_smooth: float, jit_compile: bool, similarity: str = "ncc"):
        self.factor = factor
        self.grid_shape = tuple(int(math.ceil(s / factor)) for s in atlases_full.shape[1:4])
        self.atlas_sampler = AtlasSampler(to_grid(atlases_full[..., None], factor))
        self.ncc = (FixedScanNGF(self.grid_shape) if similarity == "ngf"
                    else FixedScanNCC(self.grid_shape, window))
        self.learning_rate = learning_rate
        self.weight_smooth = weight_smooth
        self.jit_compile = jit_compile
        # XLA fuses the loss's elementwise chains and slices; compiling the whole loop was no
        # faster than compiling the step (bench/results/refinement.md). No AutoGraph here or in
        # ``ScanRefiner``: the loop is an explicit ``tf.while_loop`` and every Python ``if`` is
        # on shapes or settings, so converting the source (2/3 of the tracing, ~2 CPU s of a
        # process's first scan) would only cost time.
        self._loss_and_gradient = tf.function(self._loss_and_gradient_eager,
                                              jit_compile=jit_compile, autograph=False)

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
            total = tf.reduce_sum(loss)  # pairs are independent: each gets its own gradient
        return loss, tape.gradient(total, correction)

    def optimise(self, scan_sums, flow_start, steps):
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
    """Adam on one scan's displacement, on G_F's training objective, coarse to fine.

    ``__call__(scan_normalized [B, D, H, W, 1], flow_working [B, *working, 3] or None)`` ->
    ``{"coarse_correction": [B, *coarse grid, 3] (absent without a coarse stage),
    "fine_correction": [B, *grid, 3], "warped_atlas": [B, *grid] the atlas pulled by the refined
    displacement on the fine grid, "scan": [B, *grid] the scan there, "loss": [B] the refined
    displacement's objective there, "loss_start": [B] the start's}``, and with ``full_grid`` also ``"flow"``: [B, D, H, W, 3], the refined displacement
    on the atlas grid in full voxels. The refined displacement is the start plus the corrections,
    each on its own grid in its own voxels (``components``, ``inference.Displacement``): a label
    pull samples it where it needs it, and only ``full_grid`` builds a whole atlas-grid field.

    The start: G_F's working-grid displacement (``config`` gives its grid factor,
    ``config.downsample``) or, with ``config`` None or ``flow_working`` None, the identity (zero
    displacement: segmenting without a trained network). Coarse to fine: ``coarse_steps`` steps
    at grid factor ``coarse_factor`` (default: the network's working grid, but no finer than a
    quarter of the atlas grid),
    then ``steps`` at ``factor``. What is optimised at each grid is a correction: 0 steps leaves
    the start exactly as it is.

    ``atlas_images_normalized``: [D, H, W], or [A, D, H, W] for A atlases registered to one scan
    at once (B = 1 scan, tiled; the result has A entries) or to as many scans (A == B).
    ``settings``: a ``config.RefinementSettings`` (default: its measured defaults); keyword
    ``options`` override its fields. Raises ConfigError (a ValueError) for invalid settings.
    """

    COARSE_FACTOR = 4  # the coarse grid by default: the quarter grid (the CPU profile's)

    def __init__(self, config, atlas_images_normalized, settings: RefinementSettings = None,
                 name: str = "refinement", **options):
        super().__init__(name=name)
        settings = (settings or RefinementSettings()).replace(**options)
        atlases = tf.convert_to_tensor(atlas_images_normalized, tf.float32)
        atlases = atlases[None] if atlases.shape.rank == 3 else atlases
        self.start_factor = None if config is None else int(config.downsample)
        window = LTNetConfig().ncc_window if config is None else config.ncc_window
        # The coarse stage runs on the quarter grid at the finest (bench/results/accuracy.md: a
        # half-resolution network gains 0.010 Dice from 25 steps there, for 0.1 s).
        coarse_factor = settings.coarse_factor or max(self.start_factor or 0,
                                                      self.COARSE_FACTOR)
        self.full_shape = tuple(atlases.shape.as_list()[1:])
        self.atlas_count = int(atlases.shape[0])
        self.factor = settings.factor
        self.steps = settings.steps
        self.learning_rate = float(settings.learning_rate)
        self.weight_smooth = float(settings.weight_smooth)
        self.jit_compile = bool(settings.jit_compile)
        self.similarity = settings.similarity
        stage = lambda f: GridStage(atlases, f, window, self.learning_rate,  # noqa: E731
                                    self.weight_smooth, self.jit_compile, self.similarity)
        self.fine = stage(self.factor)
        self.grid_shape = self.fine.grid_shape
        # A coarse stage only where it is coarser than the fine grid.
        self.coarse = stage(coarse_factor) if coarse_factor > self.factor else None
        self.coarse_factor = coarse_factor if self.coarse else None
        self.coarse_steps = settings.coarse_steps if self.coarse else 0

    def settings_record(self) -> dict:
        """What ran, for prediction.json and the export metadata."""
        return {"steps": self.steps, "factor": self.factor, "grid": list(self.grid_shape),
                "coarse_steps": self.coarse_steps, "coarse_factor": self.coarse_factor,
                "learning_rate": self.learning_rate, "weight_smooth": self.weight_smooth,
                "jit_compile": self.jit_compile, "similarity": self.similarity,
                "start": "network" if self.start_factor else "identity"}

    def __call__(self, scan_normalized: tf.Tensor, flow_working: tf.Tensor = None, steps=None,
                 coarse_steps=None, full_grid: bool = False) -> dict:
        """See the class docstring; ``steps``, ``coarse_steps`` override the constructor's
        (tensors are fine)."""
        steps = tf.convert_to_tensor(self.steps if steps is None else steps, tf.int32)
        coarse_steps = tf.convert_to_tensor(
            self.coarse_steps if coarse_steps is None else coarse_steps, tf.int32)
        scan_normalized = tf.cast(scan_normalized, tf.float32)
        if self.atlas_count > 1 and scan_normalized.shape[0] == 1:
            scan_normalized = tf.repeat(scan_normalized, self.atlas_count, axis=0)
        count = tf.shape(scan_normalized)[0]
        start = self._start(flow_working, self.fine, count)
        fine_start, result = start, {}
        if self.coarse is not None:
            coarse = self.coarse
            scan_sums = coarse.ncc.scan_sums(to_grid(scan_normalized, coarse.factor))
            result["coarse_correction"] = coarse.optimise(
                scan_sums, self._start(flow_working, coarse, count), coarse_steps)
            fine_start = start + resample_displacement(
                result["coarse_correction"], coarse.factor / self.factor, self.grid_shape)
        scan_sums = self.fine.ncc.scan_sums(to_grid(scan_normalized, self.factor))
        result["fine_correction"] = self.fine.optimise(scan_sums, fine_start, steps)
        grid_flow = fine_start + result["fine_correction"]
        result.update(warped_atlas=self.fine.atlas_sampler(grid_flow), scan=scan_sums[0],
                      loss=self.fine.loss(scan_sums, grid_flow),
                      loss_start=self.fine.loss(scan_sums, start))
        if full_grid:
            result["flow"] = Displacement(self.components(flow_working, result)).full_grid(
                self.full_shape, count)
        return result

    def components(self, flow_working, outputs: dict) -> list:
        """The refined displacement as [(values [B, *grid, 3] in that grid's voxels, grid
        factor)]: G_F's start (if any), the coarse and the fine correction."""
        parts = []
        if flow_working is not None and self.start_factor is not None:
            parts.append((flow_working, self.start_factor))
        if "coarse_correction" in outputs:
            parts.append((outputs["coarse_correction"], self.coarse_factor))
        parts.append((outputs["fine_correction"], self.factor))
        return parts

    def _start(self, flow_working, stage: GridStage, count) -> tf.Tensor:
        """The starting displacement on ``stage``'s grid: G_F's resampled there, or zero."""
        if flow_working is None or self.start_factor is None:
            return tf.zeros(tf.concat([[count], stage.grid_shape, [3]], 0), tf.float32)
        return resample_displacement(tf.cast(flow_working, tf.float32),
                                     self.start_factor / stage.factor, stage.grid_shape)

    @classmethod
    def for_label_transfer(cls, label_transfer, settings: RefinementSettings = None,
                           **options) -> "Refinement":
        """The refinement of ``label_transfer``'s G_F: its config and atlas; ``settings`` and
        ``options`` as ``__init__``."""
        return cls(label_transfer.config, label_transfer.atlas_full, settings, **options)


# ------------------------------------------------------------------------------- predict.py
class ScanRefiner:
    """Refinement as ``predict.py`` runs it: one aligned scan (a ``data.Volume`` on the atlas
    grid), one or several atlas images on that grid, G_F's displacement or the identity.

    ``config``: the network's (its working grid is where G_F's displacement starts) or None
    (start from the identity). One traced call per scan; XLA compiles the steps once per process.
    """

    def __init__(self, config, atlas_images, settings: RefinementSettings = None):
        atlases = np.asarray(atlas_images, np.float32)
        atlases = atlases[None] if atlases.ndim == 3 else atlases
        normalized = data.normalize_intensity(tf.constant(atlases[..., None]))[..., 0]
        self.refinement = Refinement(config, normalized, settings)
        count, shape = len(atlases), tuple(atlases.shape[1:])
        scan_spec = tf.TensorSpec([1, *shape, 1], tf.float32)
        if config is None:
            self._refine = tf.function(lambda scan: self.refinement(scan),
                                       input_signature=[scan_spec], autograph=False)
        else:
            working = tuple(config.working_shape(shape))
            self._refine = tf.function(
                lambda scan, flow: self.refinement(scan, flow),
                input_signature=[scan_spec, tf.TensorSpec([count, *working, 3], tf.float32)],
                autograph=False)

    def settings(self) -> dict:
        return self.refinement.settings_record()

    def __call__(self, scan: data.Volume, flow_working: np.ndarray = None) -> tuple:
        """Aligned scan, G_F's working-grid displacement [(A,) *working, 3] or None ->
        (``inference.Displacement`` of the A refined displacements, numpy {"warped_atlas"
        [A, *grid] and "scan" [*grid] on the fine grid, "loss" [A], "loss_start" [A]})."""
        scan_normalized = data.normalize_intensity(
            tf.constant(np.asarray(scan.data, np.float32)[None, ..., None]))
        if flow_working is None:
            outputs = self._refine(scan_normalized)
        else:
            flow_working = np.asarray(flow_working, np.float32)
            flow_working = flow_working[None] if flow_working.ndim == 4 else flow_working
            outputs = self._refine(scan_normalized, flow_working)
        displacement = Displacement(self.refinement.components(flow_working, outputs))
        refined = {name: outputs[name].numpy() for name in ("warped_atlas", "loss", "loss_start")}
        refined["scan"] = outputs["scan"][0].numpy()
        return displacement, refined
