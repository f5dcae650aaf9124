"""Robust intensity normalisation: a scan's tissue intensities to [0, 1], whatever a few voxels hold.

Min-max scaling lets a handful of extreme voxels set the scale: a brain of intensities 0..968 with a
few dozen background voxels at +-32,000 (a scanner or converter artefact) is squeezed into
0.50-0.52, and the network and the registration metrics then see an almost flat image. Here the
scale comes from percentiles of the scan's tissue (``INTENSITY_PERCENTILES``, 0.5 % and 99.5 %),
and the result is clipped to [0, 1].

What "background" means. Skull-stripped scans fill the outside of the brain with one constant value:
0 for most MRI, -1024 for CT-like data, another value when a converter shifted the intensities. It
fills 40-90 % of a scan's box (48 % even around an ellipsoid cropped tightly), so it is the scan's
most frequent value. The background is therefore the most frequent value when that fills at least
``BACKGROUND_MIN_FRACTION`` (10 %) of the scan; it is left out of the percentiles and set to
exactly 0. A scan without such a plateau (a whole head in noisy air) has none: all voxels count.

What "tissue" means. The non-background voxels within Tukey's far-out fences (the quartiles -/+ 3
interquartile ranges). Without them, outliers as numerous as the 0.5 % tail (a few dozen voxels in
a small volume) would still move the percentiles; with them the percentiles ignore up to 25 % of
outliers that lie that far out. On 33 real brains (../shared/data: aligned, native and MICCAI
scans) the fences changed the window of one scan, by 0.9 % of its width.

What "artefact" means. A voxel brighter than the window's top by more than ``ARTEFACT_WINDOWS``
(3) window widths holds no tissue's intensity (int16 wrap-around at +32,000 over a brain of
0..968 lies 32 widths above); it is set to 0 like the background rather than to 1, so that the
scan reads as it would without it. The brightest voxels of the 33 real brains (vessels) lie at
most 1.15 widths above, and those of the same brains inverted (T2-like) 0.19.

The percentiles come from a fixed-stride subsample of at most ``MAX_SAMPLES`` voxels (every 27th of
a 160x192x224 volume), sorted with ``tf.sort``: deterministic, standard TensorFlow ops only (this
runs inside the exported SavedModel), and 0.02 s per 160x192x224 scan on 2 CPU cores (0.06 s for
2^20 samples). Percentiles interpolate linearly between ranks, as ``numpy.percentile``.
"""
from __future__ import annotations

import numpy as np

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)
import tensorflow as tf  # noqa: E402

# The one place where the normalisation's percentiles are set (of the non-background voxels, in %).
INTENSITY_PERCENTILES = (0.5, 99.5)
BACKGROUND_MIN_FRACTION = 0.1
FENCE_IQR = 3.0  # Tukey's far-out fences: quartiles -/+ 3 interquartile ranges
ARTEFACT_WINDOWS = 3.0  # brighter than the window's top by more window widths: an artefact, set to 0
MAX_SAMPLES = 2 ** 18


def _sample(scan: tf.Tensor) -> tf.Tensor:
    """[B, ...] -> every k-th voxel of each scan, sorted: [B, n] with n <= ``MAX_SAMPLES``."""
    flat = tf.reshape(scan, [tf.shape(scan)[0], -1])
    stride = (tf.shape(flat)[1] + MAX_SAMPLES - 1) // MAX_SAMPLES
    return tf.sort(flat[:, ::stride], axis=-1)


def _percentiles(value_at, start, count, percentiles) -> tf.Tensor:
    """Percentiles [B, k] of the ``count`` [B, 1] values of ranks ``start`` [B, 1] onwards, linear
    between ranks as ``numpy.percentile``."""
    last = tf.maximum(count - 1, 0)
    position = (tf.constant(percentiles, tf.float32)[None] / 100.0) * tf.cast(last, tf.float32)
    lower = tf.cast(tf.floor(position), tf.int32)
    below, above = value_at(start + lower), value_at(start + tf.minimum(lower + 1, last))
    return below + (position - tf.cast(lower, tf.float32)) * (above - below)


def intensity_window(scan: tf.Tensor, percentiles=INTENSITY_PERCENTILES) -> tuple:
    """(low, high, background, has_background), each [B], of ``scan`` [B, D, H, W, C] float32: the
    ``percentiles`` of its tissue (the voxels that are neither background nor beyond Tukey's far-out
    fences) and its background value (meaningful where ``has_background``). A scan of background
    only gives low = high = its value."""
    sample = _sample(scan)
    n = tf.shape(sample)[1]
    # In a sorted sample, a value's count is the width of its run.
    first = tf.searchsorted(sample, sample, side="left")
    counts = tf.searchsorted(sample, sample, side="right") - first
    mode_at = tf.argmax(counts, axis=-1, output_type=tf.int32)[:, None]  # the lowest on ties
    background = tf.gather(sample, mode_at, batch_dims=1)[:, 0]
    run_start = tf.gather(first, mode_at, batch_dims=1)  # [B, 1]
    run = tf.gather(counts, mode_at, batch_dims=1)
    has_background = (tf.cast(run[:, 0], tf.float32)
                      >= BACKGROUND_MIN_FRACTION * tf.cast(n, tf.float32))
    run = tf.where(has_background[:, None], run, tf.zeros_like(run))

    def value_at(rank):  # rank among the non-background values -> its value (skips the run)
        index = rank + tf.where(rank >= run_start, run, tf.zeros_like(run))
        return tf.gather(sample, tf.minimum(index, n - 1), batch_dims=1)

    def rank_of(index):  # sample index -> how many non-background values precede it
        return index - tf.clip_by_value(index - run_start, 0, run)

    quartiles = _percentiles(value_at, tf.zeros_like(run), n - run, (25.0, 75.0))
    spread = quartiles[:, 1:] - quartiles[:, :1]
    infinity = tf.fill(tf.shape(spread), float("inf"))
    low_fence = tf.where(spread > 0, quartiles[:, :1] - FENCE_IQR * spread, -infinity)
    high_fence = tf.where(spread > 0, quartiles[:, 1:] + FENCE_IQR * spread, infinity)
    start = rank_of(tf.searchsorted(sample, low_fence, side="left"))
    count = rank_of(tf.searchsorted(sample, high_fence, side="right")) - start
    window = _percentiles(value_at, start, count, percentiles)
    return window[:, 0], window[:, -1], background, has_background


def normalize(scan: tf.Tensor) -> tf.Tensor:
    """[B, D, H, W, C] any real dtype -> float32 in [0, 1], per scan: the tissue percentiles
    ``INTENSITY_PERCENTILES`` to 0 and 1, clipped; the background and artefacts exactly 0. Never
    NaN: a constant or all-zero scan gives zeros."""
    scan = tf.convert_to_tensor(scan)
    if scan.dtype != tf.float32:
        scan = tf.cast(scan, tf.float32)
    low, high, background, has_background = intensity_window(scan)
    shape = tf.concat([tf.shape(scan)[:1], tf.ones([tf.rank(scan) - 1], tf.int32)], 0)
    low, high, background, has_background = (tf.reshape(v, shape) for v in (
        low, high, background, has_background))
    # Tissue of one value (a mask given as a scan): from the background to it, not all zeros.
    low = tf.where(tf.logical_and(high <= low, has_background), background, low)
    scaled = tf.math.divide_no_nan(scan - low, high - low)
    not_tissue = tf.logical_or(tf.logical_and(has_background, tf.equal(scan, background)),
                               scaled > 1.0 + ARTEFACT_WINDOWS)
    return tf.where(not_tissue, tf.zeros_like(scaled), tf.clip_by_value(scaled, 0.0, 1.0))


# One trace for every shape (each scan's grid is its own), and no AutoGraph (no control flow).
_normalize_graph = tf.function(
    normalize, input_signature=[tf.TensorSpec([None, None, None, None, 1], tf.float32)],
    autograph=False)


def normalize_array(values: np.ndarray) -> np.ndarray:
    """One volume (numpy, any shape) -> float32, the same numbers as ``normalize`` (it runs it)."""
    values = np.asarray(values, dtype=np.float32)
    return _normalize_graph(tf.constant(values[None, ..., None]))[0, ..., 0].numpy()
