"""Test-time refinement (instance optimisation) of G_F's displacement, one scan at a time.

G_F predicts Δp_F on its working grid (``config.downsample`` times coarser than the atlas). Starting
from it, Adam minimises the training objective of G_F for this one scan,

    L = (1 - local NCC(u, x∘Δp)) + weight_smooth · L_smooth(Δp)          (same terms as training)

directly over the displacement: first on the network's working grid (cheap), then on a grid
``factor`` times coarser than the atlas (2: half resolution, finer than the network's quarter).
The result is put back on the atlas grid in full voxels (VoxelMorph's pull convention), so labels
are transferred as without refinement (``inference.warp_labels``).

What a step costs decides whether refinement is worth it, so a step is one traced loop of plain ops:

- the loss terms of ``refinement_terms``: NCC window sums as banded matrix products, the scan's
  computed once per scan; the atlas sampled through a table of each cell's 8 corners;
- Adam is written out on the displacement (no Keras optimiser, model or variable).

Measured at 80×96×112 on 2 CPU cores: see bench/results/refinement.md.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import math

import numpy as np
import tensorflow as tf

from ltnet_tf.config import LTNetConfig, RefinementSettings
from ltnet_tf.io import volumes as data
from ltnet_tf.registration import contrast, mind
from ltnet_tf.registration.gradient_fields import FixedScanNGF
from ltnet_tf.registration.refinement_terms import (AtlasSampler, FixedScanNCC, smoothness,
                                                    to_grid)
from ltnet_tf.registration.transfer import Displacement, resample_displacement


# ------------------------------------------------------------------------------- the optimiser
class GridStage:
    """Adam on a correction of the displacement at one grid (the atlas grid shrunk ``factor``
    times): the atlases there, the loss, and the traced loop. ``similarity`` 'ncc' or 'ngf'
    compare the warped atlas image with the scan; 'mind' compares the atlas's MIND-SSC
    descriptors ``atlas_features`` [A, *grid, 12] (made once, ``mind.DescriptorGrids``), warped,
    with the scan's."""

    def __init__(self, atlases_full: tf.Tensor, factor: int, window: int, learning_rate: float,
                 weight_smooth: float, jit_compile: bool, similarity: str = "ncc",
                 atlas_features: tf.Tensor = None):
        self.factor = factor
        self.grid_shape = tuple(int(math.ceil(s / factor)) for s in atlases_full.shape[1:4])
        atlases = to_grid(atlases_full[..., None], factor)
        self.atlas_sampler = AtlasSampler(atlases)
        self.similarity = similarity
        if similarity == "mind":
            points = mind.brain_points(atlases.numpy(), mind.margin_voxels(factor))
            self.feature_sampler = mind.FeatureSampler(atlas_features, points)
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

    def scan_terms(self, scan_normalized: tf.Tensor, scan_features: dict = None) -> tuple:
        """What the loss needs of the scan, made once per scan: (the scan on this grid [B, *grid],
        ...): NCC's window sums, NGF's normalised gradient, or the scan's MIND-SSC descriptors
        on this grid (``scan_features`` {factor: [B, *grid, 12]})."""
        scan = to_grid(scan_normalized, self.factor)
        if self.similarity == "mind":
            return scan, self.feature_sampler.at_points(scan_features[self.factor])
        return self.ncc.scan_sums(scan)

    def loss(self, scan_terms: tuple, flow: tf.Tensor) -> tf.Tensor:
        """[B] training objective of displacement ``flow`` on this grid."""
        if self.similarity == "mind":
            data_term = mind.descriptor_distance(scan_terms[1], self.feature_sampler(flow),
                                                 int(np.prod(self.grid_shape)))
        else:
            data_term = self.ncc(scan_terms, self.atlas_sampler(flow))
        return data_term + self.weight_smooth * smoothness(flow, for_xla=self.jit_compile)

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
        stage = lambda f, similarity, rate, **kw: GridStage(  # noqa: E731
            atlases, f, window, rate, self.weight_smooth, self.jit_compile, similarity, **kw)
        # With MIND-SSC the coarse-to-fine stages compare its descriptors, then the fine stage
        # runs local NCC on the scan mapped to the atlas's contrast.
        ncc = "ncc" if self.similarity == "mind" else self.similarity
        self.fine = stage(self.factor, ncc, self.learning_rate)
        self.grid_shape = self.fine.grid_shape
        # A coarse stage only where it is coarser than the fine grid.
        self.coarse = (stage(coarse_factor, ncc, self.learning_rate)
                       if coarse_factor > self.factor else None)
        self.coarse_factor = coarse_factor if self.coarse else None
        self.coarse_steps = settings.coarse_steps if self.coarse else 0
        self.descriptors, self.mind_stages = None, []
        if self.similarity == "mind":
            factors = [self.factor] + ([coarse_factor] if self.coarse else [])
            self.descriptors = mind.DescriptorGrids(factors)
            atlas_features = self.descriptors(atlases)  # once (per process)
            self.mind_learning_rate = float(settings.mind_learning_rate)
            self.mind_stages = [(stage(f, "mind", self.mind_learning_rate,
                                       atlas_features=atlas_features[f]), steps)
                                for f, steps in ((coarse_factor, settings.mind_coarse_steps),
                                                 (self.factor, settings.mind_steps))
                                if f in factors]

    def settings_record(self) -> dict:
        """What ran, for prediction.json and the export metadata."""
        return {"steps": self.steps, "factor": self.factor, "grid": list(self.grid_shape),
                "coarse_steps": self.coarse_steps, "coarse_factor": self.coarse_factor,
                "learning_rate": self.learning_rate, "weight_smooth": self.weight_smooth,
                "jit_compile": self.jit_compile, "similarity": self.similarity,
                "start": "network" if self.start_factor else "identity",
                **({"mind_steps": {stage.factor: steps for stage, steps in self.mind_stages},
                    "mind_learning_rate": self.mind_learning_rate} if self.mind_stages else {})}

    def __call__(self, scan_normalized: tf.Tensor, flow_working: tf.Tensor = None, steps=None,
                 coarse_steps=None, full_grid: bool = False, scan_features: dict = None) -> dict:
        """See the class docstring; ``steps``, ``coarse_steps`` override the constructor's
        (tensors are fine). ``scan_features``: with MIND-SSC, the scan's descriptors
        (``describe_scan``), else they are made here."""
        steps = tf.convert_to_tensor(self.steps if steps is None else steps, tf.int32)
        coarse_steps = tf.convert_to_tensor(
            self.coarse_steps if coarse_steps is None else coarse_steps, tf.int32)
        scan_normalized = tf.cast(scan_normalized, tf.float32)
        if self.descriptors is not None and scan_features is None:
            scan_features = self.describe_scan(scan_normalized)
        if self.atlas_count > 1 and scan_normalized.shape[0] == 1:
            scan_normalized = tf.repeat(scan_normalized, self.atlas_count, axis=0)
            if scan_features is not None:
                scan_features = {f: tf.repeat(v, self.atlas_count, axis=0)
                                 for f, v in scan_features.items()}
        count = tf.shape(scan_normalized)[0]
        start = self._start(flow_working, self.fine, count)
        corrections, terms = {}, {}
        if self.mind_stages:
            self._run(self.mind_stages, lambda stage: stage.scan_terms(scan_normalized,
                                                                       scan_features),
                      corrections, flow_working, count)
            # The scan in each atlas's contrast, through their joint histogram with the atlas
            # registered so far (the tissues overlap now).
            warped = self.fine.atlas_sampler(start + self._found(corrections, self.fine))
            scan_normalized = contrast.atlas_like_tensor(
                scan_normalized, to_grid(scan_normalized, self.factor), warped)
            stages = [(self.fine, steps)]
        else:
            stages = [(self.coarse, coarse_steps)] if self.coarse else []
            stages.append((self.fine, steps))
        self._run(stages, lambda stage: terms.setdefault(stage.factor,
                                                         stage.scan_terms(scan_normalized)),
                  corrections, flow_working, count)
        grid_flow = start + self._found(corrections, self.fine)
        result = {"fine_correction": corrections[self.factor]}
        if self.coarse is not None:
            result["coarse_correction"] = corrections[self.coarse_factor]
        scan_terms = terms[self.factor]
        result.update(warped_atlas=self.fine.atlas_sampler(grid_flow), scan=scan_terms[0],
                      loss=self.fine.loss(scan_terms, grid_flow),
                      loss_start=self.fine.loss(scan_terms, start))
        if full_grid:
            result["flow"] = Displacement(self.components(flow_working, result)).full_grid(
                self.full_shape, count)
        return result

    def _run(self, stages, terms_of, corrections: dict, flow_working, count) -> None:
        """Adam at each (``GridStage``, steps) in turn, coarse to fine, each from the start plus
        what the stages before it found; ``corrections`` {grid factor: [B, *grid, 3]} sums each
        grid's corrections."""
        for stage, steps in stages:
            begin = self._start(flow_working, stage, count) + self._found(corrections, stage)
            found = stage.optimise(terms_of(stage), begin, steps)
            corrections[stage.factor] = corrections.get(stage.factor, 0.0) + found

    @staticmethod
    def _found(corrections: dict, stage: "GridStage"):
        """The sum of ``corrections`` on ``stage``'s grid (in its voxels), or 0."""
        return sum((resample_displacement(values, factor / stage.factor, stage.grid_shape)
                    for factor, values in corrections.items()), 0.0)

    def describe_scan(self, scan_normalized) -> dict:
        """With MIND-SSC, the scan's descriptors {grid factor: [B, *grid, 12]} (once per scan);
        None for the other similarities."""
        if self.descriptors is None:
            return None
        return self.descriptors(tf.cast(scan_normalized, tf.float32)[..., 0])

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
        specs = [tf.TensorSpec([1, *shape, 1], tf.float32)]
        if self.refinement.descriptors is not None:  # MIND-SSC: the scan's, made before the call
            specs.append({stage.factor: tf.TensorSpec([1, *stage.grid_shape, mind.CHANNELS],
                                                      tf.float32)
                          for stage, _ in self.refinement.mind_stages})
        if config is not None:
            working = tuple(config.working_shape(shape))
            specs.append(tf.TensorSpec([count, *working, 3], tf.float32))
        self._refine = tf.function(self._refine_eager, input_signature=specs, autograph=False)

    def _refine_eager(self, scan, *inputs):
        features = inputs[0] if self.refinement.descriptors is not None else None
        flow = inputs[-1] if self.refinement.start_factor is not None else None
        return self.refinement(scan, flow, scan_features=features)

    def settings(self) -> dict:
        return self.refinement.settings_record()

    def __call__(self, scan: data.Volume, flow_working: np.ndarray = None) -> tuple:
        """Aligned scan, G_F's working-grid displacement [(A,) *working, 3] or None ->
        (``inference.Displacement`` of the A refined displacements, numpy {"warped_atlas"
        [A, *grid] and "scan" [*grid] on the fine grid, "loss" [A], "loss_start" [A]})."""
        scan_normalized = data.normalize_intensity(
            tf.constant(np.asarray(scan.data, np.float32)[None, ..., None]))
        inputs = [scan_normalized]
        if self.refinement.descriptors is not None:
            inputs.append(self.refinement.describe_scan(scan_normalized))
        if self.refinement.start_factor is not None:
            flow_working = np.asarray(flow_working, np.float32)
            inputs.append(flow_working[None] if flow_working.ndim == 4 else flow_working)
        outputs = self._refine(*inputs)
        displacement = Displacement(self.refinement.components(flow_working, outputs))
        refined = {name: outputs[name].numpy() for name in ("warped_atlas", "loss", "loss_start")}
        refined["scan"] = outputs["scan"][0].numpy()
        return displacement, refined
