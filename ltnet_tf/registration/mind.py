"""MIND-SSC: a modality-independent refinement loss for scans of another contrast than the atlas's
(``RefinementSettings(similarity="mind")``).

Heinrich et al., "Towards realtime multimodal fusion for image-guided interventions using
self-similarities", MICCAI 2013 (the self-similarity context, SSC), after "MIND: Modality
independent neighbourhood descriptor for multi-modal deformable registration", MedIA 2012. Each
voxel is described by how alike its neighbourhood's patches are to each other, not by its
intensity: for the 12 pairs of the six face neighbours that are sqrt(2) apart (``dilation``
voxels out), the patch distance D_p = box-filtered (I(x + a_p) - I(x + b_p))^2 over a
(2 ``radius`` + 1)^3 patch; then

    MIND_p(x) = exp(-(D_p - min_q D_q) / V(x)),   V(x) = mean_q (D_q - min D), clipped to
                                                  [1e-3, 1e3] x its mean over the volume.

The same tissue boundary gives the same descriptor whatever the sign or size of its intensity
step (a T1 atlas against T2-, FLAIR- or PD-weighted scans). The loss is the mean squared
difference of the scan's and the warped atlas's descriptors (as ConvexAdam, Siebert et al. 2021,
uses them). Same call signature as ``refinement.FixedScanNCC``.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import itertools

import tensorflow as tf

# The six face neighbours, and the 12 pairs of them that are sqrt(2) apart (not opposite).
SIX = ((-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1))
PAIRS = tuple((a, b) for a, b in itertools.combinations(SIX, 2)
              if sum((p - q) ** 2 for p, q in zip(a, b)) == 2)


def mind_ssc(volume: tf.Tensor, radius: int = 1, dilation: int = 1) -> tf.Tensor:
    """[B, D, H, W] -> [B, D, H, W, 12] MIND-SSC descriptors (see the module docstring); the
    volume's edges are mirrored for the neighbours outside it."""
    d = int(dilation)
    shape = volume.shape.as_list()[1:4]
    padded = tf.pad(volume, [[0, 0], [d, d], [d, d], [d, d]], "SYMMETRIC")

    def shifted(offset):
        start = [d + o * d for o in offset]
        return padded[:, start[0]:start[0] + shape[0], start[1]:start[1] + shape[1],
                      start[2]:start[2] + shape[2]]

    squared = tf.stack([tf.square(shifted(a) - shifted(b)) for a, b in PAIRS], -1)
    size = 2 * int(radius) + 1
    distance = tf.nn.avg_pool3d(squared, size, 1, "SAME") if radius > 0 else squared
    distance = distance - tf.reduce_min(distance, -1, keepdims=True)
    variance = tf.reduce_mean(distance, -1, keepdims=True)
    level = tf.reduce_mean(variance, axis=[1, 2, 3, 4], keepdims=True)
    variance = tf.clip_by_value(variance, level * 1e-3 + 1e-12, level * 1e3 + 1e-12)
    return tf.exp(-distance / variance)


class FixedScanMIND:
    """Mean squared difference of MIND-SSC descriptors against one fixed scan (its descriptors
    computed once, ``scan_sums``); ``__call__(terms, moved [B, D, H, W])`` -> [B] loss.
    ``shape`` is the grid's (unused: kept for ``FixedScanNCC``'s signature)."""

    def __init__(self, shape, radius: int = 1, dilation: int = 1):
        self.radius, self.dilation = int(radius), int(dilation)

    def scan_sums(self, scan: tf.Tensor) -> tuple:
        """scan [B, D, H, W] -> (scan, its descriptors [B, D, H, W, 12])."""
        return scan, mind_ssc(scan, self.radius, self.dilation)

    def __call__(self, scan_terms: tuple, moved: tf.Tensor) -> tf.Tensor:
        _, scan_descriptor = scan_terms
        difference = tf.square(mind_ssc(moved, self.radius, self.dilation) - scan_descriptor)
        count = tf.shape(moved)[0]
        return tf.reduce_mean(tf.reshape(difference, [count, -1]), axis=-1)
