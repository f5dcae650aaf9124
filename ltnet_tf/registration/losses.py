"""LT-Net's loss terms. Each returns one positive value per batch element (shape [batch]).

Per-example values let the model average over the *global* batch under ``tf.distribute``
(``tf.nn.compute_average_loss``), and positive values make every logged curve read the same way:
lower is better (0 is perfect, except that NCC is 0 only where every window varies).
"""
from ltnet_tf import compat  # noqa: F401

import tensorflow as tf
import voxelmorph as vxm


def _batch_mean(values: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=-1)


class LocalNCC:
    """L_sim = 1 - mean_p CC(p), the local normalised cross-correlation of Eq. 1 (supplementary):

        CC(p) = (Σ_{p_i} (u(p_i) - û(p)) (v(p_i) - v̂(p)))² /
                ((Σ_{p_i} (u(p_i) - û(p))²) (Σ_{p_i} (v(p_i) - v̂(p))²))

    over the n³ window around p (zero-padded at the border, means over n³ voxels). CC ∈ [0, 1], so
    the loss lies in [0, 1]. Written here rather than reusing ``vxm.losses.NCC`` because VoxelMorph
    0.2 clamps the cross term at eps, which zeroes anti-correlated windows and departs from Eq. 1.
    Window sums are separable box filters (3 × n taps instead of n³), which is what makes a 9³
    window affordable on full-resolution volumes.
    """

    def __init__(self, window: int = 9, eps: float = 1e-5):
        self.window = window
        self.eps = eps

    def _box_sum(self, volumes: tf.Tensor) -> tf.Tensor:
        """Sum over the n³ window of each channel, channels folded into the batch axis."""
        shape = tf.shape(volumes)
        channels = volumes.shape[-1]
        folded = tf.reshape(tf.transpose(volumes, [0, 4, 1, 2, 3]),
                            [-1, shape[1], shape[2], shape[3], 1])
        for axis in range(3):
            kernel_shape = [1, 1, 1, 1, 1]
            kernel_shape[axis] = self.window
            folded = tf.nn.conv3d(folded, tf.ones(kernel_shape, folded.dtype), [1] * 5, "SAME")
        unfolded = tf.reshape(folded, [shape[0], channels, shape[1], shape[2], shape[3]])
        return tf.transpose(unfolded, [0, 2, 3, 4, 1])

    def correlation(self, target: tf.Tensor, moved: tf.Tensor) -> tf.Tensor:
        target = tf.cast(target, tf.float32)
        moved = tf.cast(moved, tf.float32)
        stacked = tf.concat([target, moved, target * target, moved * moved, target * moved], -1)
        t_sum, m_sum, t2_sum, m2_sum, tm_sum = tf.unstack(self._box_sum(stacked), axis=-1)
        window_size = float(self.window ** 3)
        t_mean, m_mean = t_sum / window_size, m_sum / window_size
        cross = tm_sum - m_mean * t_sum - t_mean * m_sum + t_mean * m_mean * window_size
        t_var = tf.maximum(t2_sum - 2 * t_mean * t_sum + t_mean * t_mean * window_size, 0.0)
        m_var = tf.maximum(m2_sum - 2 * m_mean * m_sum + m_mean * m_mean * window_size, 0.0)
        return cross * cross / (t_var * m_var + self.eps)

    def __call__(self, target: tf.Tensor, moved: tf.Tensor) -> tf.Tensor:
        return 1.0 - _batch_mean(self.correlation(target, moved))


def smoothness(displacement: tf.Tensor) -> tf.Tensor:
    """L_smooth, Eq. 2-3: mean over x, y, z of the mean squared forward difference of Δp."""
    return vxm.losses.Grad("l2").loss(None, tf.cast(displacement, tf.float32))


class Adversarial:
    """GAN losses on discriminator logits: 'lsgan' (least squares, stable in 3D) or 'bce'."""

    def __init__(self, mode: str = "lsgan"):
        if mode not in ("lsgan", "bce"):
            raise ValueError(f"unknown GAN mode {mode!r}")
        self.mode = mode

    def _distance(self, logits: tf.Tensor, label: float) -> tf.Tensor:
        logits = tf.cast(logits, tf.float32)
        if self.mode == "lsgan":
            return _batch_mean(tf.square(logits - label))
        targets = tf.fill(tf.shape(logits), label)
        return _batch_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits))

    def discriminator_loss(self, real_logits: tf.Tensor, fake_logits: tf.Tensor) -> tf.Tensor:
        """d_loss: D says 1 for real scans u and 0 for warped atlases ū."""
        return 0.5 * (self._distance(real_logits, 1.0) + self._distance(fake_logits, 0.0))

    def generator_loss(self, fake_logits: tf.Tensor) -> tf.Tensor:
        """adv: G_F wants D to say 1 for its warped atlas."""
        return self._distance(fake_logits, 1.0)


def image_cycle(atlas: tf.Tensor, cycled_atlas: tf.Tensor) -> tf.Tensor:
    """cyc_img: mean |x̄ - x|, the atlas against itself carried forward then backward."""
    return _batch_mean(tf.abs(tf.cast(cycled_atlas, tf.float32) - tf.cast(atlas, tf.float32)))


def soft_dice_loss(reference_onehot: tf.Tensor, predicted_onehot: tf.Tensor,
                   smooth: float = 1e-5) -> tf.Tensor:
    """1 - mean soft Dice over the foreground labels (channel 0 is background and is left out).

    Dice = 2 Σ a·b / (Σ a² + Σ b²) (the V-Net form): it is exactly 1 when the maps are equal even
    if they are soft, as the atlas labels are at a reduced working resolution (with Σa + Σb in the
    denominator, a soft map would not even match itself). A label absent from both counts as 1.
    """
    reference = tf.cast(reference_onehot[..., 1:], tf.float32)
    predicted = tf.cast(predicted_onehot[..., 1:], tf.float32)
    spatial_axes = [1, 2, 3]
    overlap = tf.reduce_sum(reference * predicted, axis=spatial_axes)
    total = (tf.reduce_sum(tf.square(reference), axis=spatial_axes)
             + tf.reduce_sum(tf.square(predicted), axis=spatial_axes))
    dice = (2.0 * overlap + smooth) / (total + smooth)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def compose_displacements(forward: tf.Tensor, backward: tf.Tensor) -> tf.Tensor:
    """The displacement of "warp by Δp_F, then by Δp_B", for VoxelMorph's pull convention.

    ū(p) = x(p + Δp_F(p)) and x̄(p) = ū(p + Δp_B(p)) = x(p + Δp_B(p) + Δp_F(p + Δp_B(p))), so
    x̄ = x∘c with c(p) = Δp_B(p) + Δp_F(p + Δp_B(p)): Δp_F is resampled at the points that Δp_B
    pulls from, i.e. warped by Δp_B like any image, then added to Δp_B.
    """
    forward = tf.cast(forward, tf.float32)
    backward = tf.cast(backward, tf.float32)
    return backward + vxm.layers.SpatialTransformer(fill_value=None)([forward, backward])


def displacement_norm(displacement: tf.Tensor) -> tf.Tensor:
    """Mean squared norm of a displacement field, per batch element."""
    return _batch_mean(tf.reduce_sum(tf.square(tf.cast(displacement, tf.float32)), axis=-1))


def transformation_cycle(forward: tf.Tensor, backward: tf.Tensor) -> tf.Tensor:
    """cyc_flow: mean squared norm of the composed displacement, 0 for an exact inverse pair."""
    return displacement_norm(compose_displacements(forward, backward))
