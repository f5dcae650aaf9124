"""A trained segmenter: scan -> label probabilities on the working grid -> labels on any grid; and
its files in the run folder.

    RUN/segmenter/config.json      the SegmenterConfig (atlas grid, brain box, label IDs, ...)
    RUN/segmenter/network.json     the U-Net's Keras JSON, for reading (loading rebuilds the
                                   network from config.json: no code from the folder runs)
    RUN/segmenter/weights.h5       its weights (HDF5; no pickles)
    RUN/segmenter/training.json    how it was trained: teacher, examples, steps, minutes, losses
    RUN/segmenter/saved_model/<version>/   its SavedModel for TF Serving (``export``)

Labels on a fine grid from probabilities on the coarse working grid, cheaply. Upsampling the
probabilities of every label to the scan's grid and taking the argmax is what keeps boundaries
at their sub-voxel place (true labels of sub-06/07 pooled x2 and brought back reach Dice 0.951
this way, 0.909 when the pooled argmax alone is interpolated: ``bench/results/segmenter.md``,
``python -m bench.segmenter`` at commit 6c983c5), but it costs L volumes of the scan's size.
Here each fine point's label is the argmax of the trilinearly interpolated probabilities
computed only where it can differ from the coarse argmax: in a cell whose 8 corners share one
argmax label, that label wins the interpolation too (it is the largest at every corner); in the
other cells (near boundaries) the interpolated probability of each of the corners' argmax labels
is compared (at most 8 candidates, not L). Memory and time are those of the label transfer's own
pull (``registration.native``).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import json
import os

import numpy as np
import tensorflow as tf

from ltnet_tf.config import ConfigError, SegmenterConfig
from ltnet_tf.files import atomic_path, atomic_write, write_json
from ltnet_tf.io import volumes as data
from ltnet_tf.registration import transfer
from ltnet_tf.registration.native import POINTS_PER_CHUNK, native_points_in_reach
from ltnet_tf.segmentation import synthesis
from ltnet_tf.segmentation.network import build_unet

FOLDER = "segmenter"
CONFIG, NETWORK, WEIGHTS, TRAINING = "config.json", "network.json", "weights.h5", "training.json"


class SegmenterError(ValueError):
    """A segmenter folder that cannot be used; the message names the file and the problem."""


def working_coordinates(points: tf.Tensor, config: SegmenterConfig) -> tf.Tensor:
    """Atlas-grid voxel coordinates [..., 3] -> working-grid coordinates (voxel centres as average
    pooling places them)."""
    start = tf.constant(config.crop_start, tf.float32)
    factor = float(config.downsample)
    return (points - start + 0.5) / factor - 0.5


def in_box(points: tf.Tensor, config: SegmenterConfig) -> tf.Tensor:
    """[..., 3] atlas-grid coordinates -> bool: inside the brain box (half a voxel of margin)."""
    start = tf.constant(config.crop_start, tf.float32)
    stop = start + tf.constant(config.crop_shape, tf.float32)
    return tf.reduce_all((points >= start - 0.5) & (points <= stop - 0.5), -1)


def label_indices_at(probabilities: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """The argmax of ``probabilities`` [d, h, w, L] interpolated trilinearly at working-grid
    coordinates ``points`` [N, 3] (clipped to the grid) -> label positions [N] int32, computed
    as the module docstring says."""
    shape = probabilities.shape.as_list()[:3]
    count = probabilities.shape[-1]
    points = tf.clip_by_value(points, 0.0, tf.constant([s - 1 for s in shape], tf.float32))
    argmax = tf.argmax(probabilities, -1, output_type=tf.int32)
    cells = transfer.uniform_cell_labels(argmax)
    lower = transfer.flat_index(tf.cast(tf.floor(points), tf.int32), shape)
    labels = tf.gather(tf.reshape(cells, [-1]), lower)
    mixed = tf.where(tf.equal(labels, transfer.MIXED_CELL))[:, 0]
    indices, weights = transfer.corners(tf.gather(points, mixed), shape)  # [M, 8]
    candidates = tf.gather(tf.reshape(argmax, [-1]), indices)  # [M, 8]
    values = tf.gather(tf.reshape(probabilities, [-1]),
                       indices[:, :, None] * count + candidates[:, None, :])  # [M, 8, 8]
    scores = tf.reduce_sum(weights[:, :, None] * values, axis=1)  # [M, 8 candidates]
    winners = tf.gather(candidates, tf.argmax(scores, -1, output_type=tf.int32)[:, None],
                        batch_dims=1)[:, 0]
    return tf.tensor_scatter_nd_update(labels, mixed[:, None], winners)


class Segmenter(tf.Module):
    """A trained U-Net with its config: ``probabilities`` of a scan on the atlas grid, its labels
    at any points of the atlas grid (``labels_at``), or on a scan's own grid (``segment``)."""

    def __init__(self, config: SegmenterConfig, model: tf.keras.Model, training: dict = None):
        super().__init__(name="segmenter")
        self.config, self.model, self.training = config, model, training or {}
        self.label_ids = tf.constant(np.asarray(config.label_ids, np.int32))
        grid = tf.TensorSpec([*config.atlas_shape], tf.float32)
        self._probabilities = tf.function(self.working_probabilities, input_signature=[grid])
        self._labels = tf.function(self.labels_at_points, reduce_retracing=True)
        self._shares = tf.function(self.shares_at_points, reduce_retracing=True)

    # ------------------------------------------------------------------ graph pieces
    def working_probabilities(self, scan: tf.Tensor) -> tf.Tensor:
        """Raw intensities [D, H, W] on the atlas grid -> probabilities [*working_shape, L]."""
        normalised = data.normalize_intensity(tf.cast(scan, tf.float32)[None, ..., None])
        logits = self.model(synthesis.to_working(normalised, self.config), training=False)
        return tf.nn.softmax(logits[0])

    def labels_at_points(self, probabilities: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
        """Label IDs [N] int32 at atlas-grid coordinates ``points`` [N, 3] (0 outside the box)."""
        indices = label_indices_at(probabilities, working_coordinates(points, self.config))
        return tf.where(in_box(points, self.config), tf.gather(self.label_ids, indices), 0)

    def shares_at_points(self, probabilities: tf.Tensor, points: tf.Tensor,
                         wanted: tf.Tensor) -> tf.Tensor:
        """[len(wanted), N]: the interpolated probabilities of label positions ``wanted``."""
        chosen = tf.gather(probabilities, wanted, axis=-1)
        size = tf.constant([s - 1 for s in chosen.shape.as_list()[:3]], tf.float32)
        coordinates = tf.clip_by_value(working_coordinates(points, self.config), 0.0, size)
        values = transfer.sample_linear(chosen, coordinates)
        return tf.transpose(values * tf.cast(in_box(points, self.config), tf.float32)[:, None])

    # ------------------------------------------------------------------ numpy entry points
    def probabilities(self, scan_on_grid: np.ndarray) -> tf.Tensor:
        """[*working_shape, L] for a scan [D, H, W] on the atlas grid. Raises DataError for
        another grid."""
        if tuple(scan_on_grid.shape) != tuple(self.config.atlas_shape):
            raise data.DataError(f"scan of shape {tuple(scan_on_grid.shape)} is not on the "
                                 f"segmenter's atlas grid {tuple(self.config.atlas_shape)}: "
                                 f"align it to the atlas first")
        return self._probabilities(tf.constant(np.asarray(scan_on_grid, np.float32)))

    def segment(self, probabilities: tf.Tensor, native_to_grid: np.ndarray, native_shape,
                mask: np.ndarray = None, probabilities_of=None):
        """Labels on a scan's own grid: each native voxel (of ``mask``, [*native_shape] bool, or
        all) taken to the atlas grid by ``native_to_grid`` (4x4, voxels) and labelled there ->
        label IDs [*native_shape] int32, or with ``probabilities_of`` (label IDs) also their
        probabilities [len, *native_shape] uint8 (x 255)."""
        native_shape = tuple(int(s) for s in native_shape)
        segmentation = np.zeros(int(np.prod(native_shape)), np.int32)
        start = np.asarray(self.config.crop_start, np.float64)
        box = (start, start + np.asarray(self.config.crop_shape) - 1)
        flat, points = native_points_in_reach(native_to_grid, native_shape, box, 1.0, mask)
        wanted, shares = None, None
        if probabilities_of:
            positions = {int(i): k for k, i in enumerate(self.config.label_ids)}
            wanted = tf.constant([positions.get(int(i), 0) for i in probabilities_of], tf.int32)
            shares = np.zeros((len(probabilities_of), segmentation.size), np.uint8)
        for begin in range(0, len(flat), POINTS_PER_CHUNK):
            chunk = tf.constant(points[begin:begin + POINTS_PER_CHUNK])
            where = flat[begin:begin + POINTS_PER_CHUNK]
            segmentation[where] = self._labels(probabilities, chunk).numpy()
            if shares is not None:
                values = self._shares(probabilities, chunk, wanted).numpy()
                shares[:, where] = np.rint(255 * np.clip(values, 0, 1)).astype(np.uint8)
        segmentation = segmentation.reshape(native_shape)
        if shares is None:
            return segmentation
        return segmentation, shares.reshape(-1, *native_shape)

    # ------------------------------------------------------------------ files
    def save(self, folder: str) -> str:
        """Write config.json, network.json, weights.h5 and training.json into ``folder`` (each
        atomically) -> the folder."""
        os.makedirs(folder, exist_ok=True)
        with atomic_write(os.path.join(folder, NETWORK)) as f:
            f.write(self.model.to_json())
        with atomic_path(os.path.join(folder, WEIGHTS)) as tmp:
            self.model.save_weights(tmp, save_format="h5")
        write_json(self.training, os.path.join(folder, TRAINING))
        write_json(self.config.to_dict(), os.path.join(folder, CONFIG))  # last: marks it whole
        return folder

    @classmethod
    def load(cls, folder: str) -> "Segmenter":
        """The segmenter saved in ``folder``. Raises SegmenterError naming the file for a missing,
        unreadable or mismatched one."""
        paths = {name: os.path.join(folder, name) for name in (CONFIG, WEIGHTS)}
        for path in paths.values():
            if not os.path.isfile(path):
                raise SegmenterError(f"{folder}: incomplete segmenter ({os.path.basename(path)} "
                                     f"missing)")
        try:
            with open(paths[CONFIG]) as f:
                config = SegmenterConfig.from_dict(json.load(f))
        except (ValueError, TypeError, ConfigError) as e:
            raise SegmenterError(f"{paths[CONFIG]}: unreadable segmenter config ({e})") from None
        try:
            # Rebuilt from the config, never from network.json: a Keras JSON may hold Lambda
            # layers, whose deserialisation runs code from the file.
            model = build_unet(config)
            model.load_weights(paths[WEIGHTS])
        except Exception as e:  # noqa: BLE001  (h5py OSError, Keras ValueError...)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SegmenterError(f"{paths[WEIGHTS]}: cannot be loaded ({reason})") from None
        training = {}
        if os.path.isfile(os.path.join(folder, TRAINING)):
            with open(os.path.join(folder, TRAINING)) as f:
                training = json.load(f)
        return cls(config, model, training)

    @classmethod
    def untrained(cls, config: SegmenterConfig) -> "Segmenter":
        return cls(config, build_unet(config))


def segmenter_folder(run_path: str) -> str:
    return os.path.join(run_path, FOLDER)


def has_segmenter(run_path: str) -> bool:
    return os.path.isfile(os.path.join(segmenter_folder(run_path), CONFIG))
