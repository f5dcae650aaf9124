"""The segmentation network: a 3D U-Net (Ronneberger et al. 2015; Çiçek et al. 2016, the 3D form)
from a normalised scan on the working grid to per-structure logits.

Built from plain Keras layers only (Conv3D, LeakyReLU, MaxPooling3D, UpSampling3D, Concatenate), so
the model is saved as its Keras JSON plus weights (``segmenter.py``): no pickles, no Lambda layers,
nothing but ``tf.keras`` needed to rebuild it. The working grid is the atlas's brain box
(``SegmenterConfig.crop_start``/``crop_shape``) average-pooled by ``downsample``.

Shape of the U-Net: level 0 (the working grid) has one convolution on the way down and one on the
way up; deeper levels two on the way down and one on the way up, each 3x3x3 with LeakyReLU(0.2);
max-pooling by 2 between levels, nearest upsampling and skip concatenation on the way up, then a
1x1x1 convolution to ``len(label_ids)`` logits. Level 0 is kept to one convolution each way
because at the working grid's size (80x96x104 for the 160x192x224 atlas at half resolution) its
convolutions are most of a step's cost.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import numpy as np
import tensorflow as tf

from ltnet_tf.config import SegmenterConfig

KL = tf.keras.layers


def _conv(x, features: int, name: str):
    x = KL.Conv3D(int(features), 3, padding="same", name=f"{name}_conv")(x)
    return KL.LeakyReLU(0.2, name=f"{name}_act")(x)


def build_unet(config: SegmenterConfig, name: str = "segmenter") -> tf.keras.Model:
    """[B, *config.working_shape, 1] normalised intensities -> [B, *working_shape, L] logits
    (L = len(config.label_ids)). Spatial sizes are left open (training takes patches of the
    working grid); each must be divisible by 2**levels. Raises ConfigError (via ``config.validate``) for bad settings and
    ValueError when the working shape is not divisible by 2**levels."""
    config.validate()
    shape = config.working_shape
    if any(s % 2 ** config.levels for s in shape):
        raise ValueError(f"working shape {shape} must be divisible by {2 ** config.levels}")
    scan = KL.Input(shape=(None, None, None, 1), name="scan")
    x, skips = scan, []
    for level, features in enumerate(config.features):
        x = _conv(x, features, f"{name}_enc{level}a")
        if level > 0:
            x = _conv(x, features, f"{name}_enc{level}b")
        if level < config.levels:
            skips.append(x)
            x = KL.AveragePooling3D(2, name=f"{name}_pool{level}")(x)
    for level in reversed(range(config.levels)):
        x = KL.UpSampling3D(2, name=f"{name}_up{level}")(x)
        x = KL.Concatenate(name=f"{name}_skip{level}")([x, skips[level]])
        x = _conv(x, config.features[level], f"{name}_dec{level}")
    logits = KL.Conv3D(len(config.label_ids), 1, name=f"{name}_logits")(x)
    return tf.keras.Model(scan, logits, name=name)


def model_to_json(model: tf.keras.Model) -> str:
    return model.to_json()


def crop_box(atlas_brain: np.ndarray, config: SegmenterConfig) -> tuple:
    """(start, shape) on the atlas grid of the box the network sees: the atlas's brain (non-zero
    voxels) with ``config.crop_margin`` voxels around it, grown to a multiple of
    ``config.grid_multiple`` and kept inside the grid where it fits (a grid smaller than the box
    is padded with background: ``working_input``). ``atlas_brain`` [D, H, W] bool."""
    grid = np.asarray(atlas_brain.shape)
    found = np.argwhere(atlas_brain)
    low, high = ((found.min(0), found.max(0) + 1) if len(found) else (np.zeros(3, int), grid))
    low, high = np.maximum(low - config.crop_margin, 0), np.minimum(high + config.crop_margin, grid)
    multiple = config.grid_multiple
    size = -(-(high - low) // multiple) * multiple
    start = np.clip((low + high) // 2 - size // 2, 0, np.maximum(grid - size, 0))
    return [int(s) for s in start], [int(s) for s in size]


# ------------------------------------------------------------------------------- training speed
@tf.custom_gradient
def _conv3d_same(inputs, kernel):
    """``tf.nn.conv3d`` (stride 1, SAME, odd kernel) with a cheaper gradient on CPU: TensorFlow's
    Conv3DBackpropInput/Filter kernels take 3x and 7x a forward pass on CPU for small channel
    counts (measured on 48³ x 16 channels), so the input gradient is computed as a forward
    convolution with the flipped, transposed kernel and the kernel gradient as one matrix
    product per kernel offset. Same values (relative difference ~1e-6), a training step ~3x
    cheaper."""
    outputs = tf.nn.conv3d(inputs, kernel, [1] * 5, "SAME")

    def gradient(d_outputs):
        flipped = tf.transpose(tf.reverse(kernel, [0, 1, 2]), [0, 1, 2, 4, 3])
        d_inputs = tf.nn.conv3d(d_outputs, flipped, [1] * 5, "SAME")
        size, pad = kernel.shape[0], kernel.shape[0] // 2
        padded = tf.pad(inputs, [[0, 0], [pad, pad], [pad, pad], [pad, pad], [0, 0]])
        shape = tf.shape(inputs)
        d_flat = tf.reshape(d_outputs, [-1, kernel.shape[4]])
        d_kernel = [tf.matmul(tf.reshape(padded[:, a:a + shape[1], b:b + shape[2],
                                                c:c + shape[3], :], [-1, kernel.shape[3]]),
                              d_flat, transpose_a=True)
                    for a in range(size) for b in range(size) for c in range(size)]
        return d_inputs, tf.reshape(tf.stack(d_kernel), kernel.shape)

    return outputs, gradient


def use_fast_training_gradients(model: tf.keras.Model) -> None:
    """Give every 3x3x3 Conv3D of ``model`` the cheaper gradient of ``_conv3d_same`` (an
    attribute of the layer objects only: the saved JSON and weights are unchanged)."""
    for layer in model.layers:
        if (isinstance(layer, KL.Conv3D) and tuple(layer.kernel_size) == (3, 3, 3)
                and tuple(layer.strides) == (1, 1, 1) and layer.padding == "same"
                and tuple(layer.dilation_rate) == (1, 1, 1)):
            layer.convolution_op = _conv3d_same
