"""Normalised gradient fields: a refinement loss for scans of another contrast than the atlas's
(``RefinementSettings(similarity="ngf")``). Measured, not the default: see
``ltnet_tf.registration.contrast`` for what is used instead and why.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import tensorflow as tf


class FixedScanNGF:
    """1 - normalised gradient fields (Haber & Modersitzki, "Intensity gradient based registration
    and fusion of multi-modal images", MICCAI 2006) against one fixed scan: the mean over voxels
    of (n_s . grad m)^2 / (|grad m|^2 + eps^2), n_s the scan's gradient over
    sqrt(|grad s|^2 + eps^2). It asks edges to lie where the scan's lie, whatever the sign or size
    of the intensity step: a T1 atlas against T2-, FLAIR- or PD-weighted scans. Forward
    differences on normalised intensities; ``eps`` (per voxel of the grid) keeps noise from
    counting as edges. Same call signature as ``FixedScanNCC``.
    """

    def __init__(self, shape, eps: float = 0.05):
        self.eps2 = float(eps) ** 2

    @staticmethod
    def gradient(volume: tf.Tensor) -> tf.Tensor:
        """[B, D, H, W] -> [B, D-1, H-1, W-1, 3] forward differences."""
        corner = volume[:, :-1, :-1, :-1]
        return tf.stack([volume[:, 1:, :-1, :-1] - corner, volume[:, :-1, 1:, :-1] - corner,
                         volume[:, :-1, :-1, 1:] - corner], -1)

    def scan_sums(self, scan: tf.Tensor) -> tuple:
        """scan [B, D, H, W] -> (scan, its normalised gradient)."""
        gradient = self.gradient(scan)
        norm = tf.sqrt(tf.reduce_sum(tf.square(gradient), -1, keepdims=True) + self.eps2)
        return scan, gradient / norm

    def __call__(self, scan_terms: tuple, moved: tf.Tensor) -> tf.Tensor:
        """moved [B, D, H, W] -> [B] loss."""
        _, scan_normal = scan_terms
        gradient = self.gradient(moved)
        aligned = tf.square(tf.reduce_sum(scan_normal * gradient, -1))
        squared = tf.reduce_sum(tf.square(gradient), -1) + self.eps2
        count = tf.shape(moved)[0]
        return 1.0 - tf.reduce_mean(tf.reshape(aligned / squared, [count, -1]), axis=-1)
