"""The segmenter's own SavedModel for TF Serving: ``RUN/segmenter/saved_model/<version>/``.

It is a SavedModel of its own (point TF Serving's ``--model_base_path`` at
``RUN/segmenter/saved_model``), beside G_F's ``RUN/saved_model``: G_F's SavedModel already has a
``segment`` signature (the label transfer), so the two never share a signature name. Signatures,
both the same function:

    segment(scan [B, D, H, W, 1] float32 raw intensities on the atlas grid)
        -> segmentation [B, D, H, W] int32 label IDs on the atlas grid (0 outside the scan's
           brain: its non-zero voxels, when at least 5 % of the scan is zero),
           probabilities [B, d, h, w, L] float32 on the working grid (the brain box
           ``crop_start``/``crop_shape`` of the metadata pooled by ``downsample``; channel k is
           label ``label_ids[k]``)
    serving_default: the same

Normalisation (``ltnet_tf.io.intensity``) and the input check (``serving.serving_inputs``: a scan
of another shape gets "scan must be [batch, D, H, W, 1] float32 raw intensities on the atlas grid
... align it to the atlas ... first") are inside the graph; it loads with plain
``tf.saved_model.load``, no ltnet_tf, Keras model code or VoxelMorph needed.
``assets.extra/ltnet_segmenter.json`` tells a client the grid, the box and the label IDs.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import json
import os
import shutil
import tempfile

import tensorflow as tf

import ltnet_tf
from ltnet_tf.serving.serving_inputs import for_atlas_grid

SEGMENT_SIGNATURE, SERVING_SIGNATURE = "segment", "serving_default"
METADATA_PATH = os.path.join("assets.extra", "ltnet_segmenter.json")
METADATA_FORMAT = "ltnet_segmenter/1"
EMPTY_BACKGROUND = 0.05  # below this share of zero voxels a scan has no background: label all


class SegmenterServing(tf.Module):
    """A ``segmenter.Segmenter`` behind checked ``tf.function`` signatures."""

    def __init__(self, segmenter):
        super().__init__(name="ltnet_segmenter")
        self.segmenter = segmenter
        self.network_variables = list(segmenter.model.variables)
        self._input = for_atlas_grid(segmenter.config.atlas_shape)["scan"]
        self.segment = tf.function(self._segment,
                                   input_signature=[self._input.signature_spec])

    def _one(self, scan: tf.Tensor) -> tuple:
        config = self.segmenter.config
        probabilities = self.segmenter.working_probabilities(scan)
        start, shape = config.crop_start, config.crop_shape
        grid = [int(s) for s in config.atlas_shape]
        stop = [min(s + n, g) for s, n, g in zip(start, shape, grid)]
        axes = [tf.range(s, e, dtype=tf.float32) for s, e in zip(start, stop)]
        points = tf.reshape(tf.stack(tf.meshgrid(*axes, indexing="ij"), -1), [-1, 3])
        labels = self.segmenter.labels_at_points(probabilities, points)
        box = tf.reshape(labels, [e - s for s, e in zip(start, stop)])
        full = tf.pad(box, [[s, g - e] for s, e, g in zip(start, stop, grid)])
        has_background = tf.reduce_mean(tf.cast(tf.equal(scan, 0.0), tf.float32)) >= \
            EMPTY_BACKGROUND
        brain = tf.logical_or(tf.not_equal(scan, 0.0), tf.logical_not(has_background))
        return tf.where(brain, full, 0), probabilities

    def _segment(self, scan):
        scan = self._input.checked(scan)[..., 0]
        labels, probabilities = tf.map_fn(
            self._one, scan, fn_output_signature=(tf.int32, tf.float32))
        return {"segmentation": labels, "probabilities": probabilities}

    def signatures(self) -> dict:
        function = self.segment.get_concrete_function()
        return {SEGMENT_SIGNATURE: function, SERVING_SIGNATURE: function}


def metadata(segmenter, version: int) -> dict:
    config = segmenter.config
    return {"format": METADATA_FORMAT, "version": version,
            "atlas_shape": [int(s) for s in config.atlas_shape],
            "crop_start": config.crop_start, "crop_shape": config.crop_shape,
            "downsample": int(config.downsample),
            "working_shape": [int(s) for s in config.working_shape],
            "label_ids": [int(i) for i in config.label_ids],
            "signatures": {name: {"inputs": {"scan": [None, *config.atlas_shape, 1]},
                                  "outputs": {"segmentation": [None, *config.atlas_shape],
                                              "probabilities": [None, *config.working_shape,
                                                                len(config.label_ids)]}}
                           for name in (SEGMENT_SIGNATURE, SERVING_SIGNATURE)},
            "intensities": "raw; per-scan normalisation is inside the signatures",
            "segmenter_config": config.to_dict(),
            "ltnet_tf_version": ltnet_tf.__version__, "tensorflow_version": tf.__version__}


def export_segmenter(segmenter, folder: str) -> str:
    """Write ``folder``/saved_model/<next version>/ (staged under a hidden name, then renamed:
    TF Serving never sees half a version) -> its path."""
    base = os.path.join(folder, "saved_model")
    os.makedirs(base, exist_ok=True)
    versions = [int(v) for v in os.listdir(base) if v.isdigit()]
    version = max(versions, default=0) + 1
    module = SegmenterServing(segmenter)
    staging = tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=base)
    final = os.path.join(base, str(version))
    try:
        # Serving runs the signatures forward only: the network's custom gradients are not
        # saved (tracing them took most of an export's time).
        tf.saved_model.save(module, staging, signatures=module.signatures(),
                            options=tf.saved_model.SaveOptions(
                                experimental_custom_gradients=False))
        os.makedirs(os.path.join(staging, "assets.extra"), exist_ok=True)
        with open(os.path.join(staging, METADATA_PATH), "w") as f:
            json.dump(metadata(segmenter, version), f, indent=2)
            f.write("\n")
        os.chmod(staging, 0o755)
        os.rename(staging, final)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return final


def latest_export(folder: str):
    base = os.path.join(folder, "saved_model")
    versions = sorted(int(v) for v in os.listdir(base) if v.isdigit()) if os.path.isdir(base) \
        else []
    return os.path.join(base, str(versions[-1])) if versions else None
