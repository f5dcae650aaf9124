"""The three networks of LT-Net: G_F and G_B (VoxelMorph U-Nets) and the 3D discriminator D.

G_F and G_B subclass ``vxm.networks.VxmDense`` without adding constructor arguments, so the
``.h5`` that Keras writes for them is rebuilt by VoxelMorph's own ``VxmDense.load(path)``.
Both return ``[warped_source, displacement]``: the displacement is the full-resolution one that
warps the source (``reg_field='warp'``), which is what every LT-Net loss is defined on.
"""
from ltnet_tf import compat  # noqa: F401

import tensorflow as tf
import voxelmorph as vxm

from ltnet_tf.config import LTNetConfig

KL = tf.keras.layers


def _vxm_arguments(config: LTNetConfig, name: str) -> dict:
    return dict(
        inshape=tuple(config.working_shape()),
        nb_unet_features=[list(config.enc_features), list(config.dec_features)],
        int_steps=config.int_steps,
        reg_field="warp",
        name=name,
    )


class ForwardGenerator(vxm.networks.VxmDense):
    """G_F: (atlas x, scan u) -> (warped atlas x∘Δp_F, forward displacement Δp_F).

    ``x∘Δp_F(p) = x(p + Δp_F(p))``: VoxelMorph's ``SpatialTransformer`` convention.
    """

    @classmethod
    def from_ltnet_config(cls, config: LTNetConfig) -> "ForwardGenerator":
        return cls(**_vxm_arguments(config, "forward_generator"))


class BackwardGenerator(vxm.networks.VxmDense):
    """G_B: (warped atlas ū, atlas x) -> (cycled atlas ū∘Δp_B, backward displacement Δp_B)."""

    @classmethod
    def from_ltnet_config(cls, config: LTNetConfig) -> "BackwardGenerator":
        return cls(**_vxm_arguments(config, "backward_generator"))


class SpaceToDepth3D(KL.Layer):
    """[B, D, H, W, C] -> [B, D/2, H/2, W/2, 8C]: each 2x2x2 block becomes one voxel's channels
    (odd sizes are zero-padded at the end first). Followed by a Dense layer it is exactly a
    kernel-2, stride-2 Conv3D, but its gradient is a reshape and a matmul: on CPU, TensorFlow's
    strided Conv3D gradients cost ~100x more (bench.speed at commit 07f69df)."""

    def call(self, features):
        shape = tf.shape(features)
        pad = [[0, 0]] + [[0, shape[i] % 2] for i in (1, 2, 3)] + [[0, 0]]
        features = tf.pad(features, pad)
        channels = features.shape[-1]
        half = [(tf.shape(features)[i]) // 2 for i in (1, 2, 3)]
        blocks = tf.reshape(features, [-1, half[0], 2, half[1], 2, half[2], 2, channels])
        blocks = tf.transpose(blocks, [0, 1, 3, 5, 2, 4, 6, 7])
        return tf.reshape(blocks, [-1, half[0], half[1], half[2], 8 * channels])

    def compute_output_shape(self, input_shape):
        halve = lambda n: None if n is None else (n + 1) // 2  # noqa: E731
        return (input_shape[0], *[halve(n) for n in input_shape[1:4]], 8 * input_shape[4])


def build_discriminator(config: LTNetConfig, name: str = "discriminator") -> tf.keras.Model:
    """A 3D PatchGAN: stride-2 downsamplings, then a 3x3x3 convolution, one real/fake logit per
    patch (24 voxels across for three levels).

    Patch logits (rather than one per volume) keep the adversarial signal local, which suits
    registration: it rewards realistic local anatomy in the warped atlas. Each downsampling is a
    kernel-2 stride-2 convolution written as SpaceToDepth3D + Dense (see there for why).
    """
    scan = tf.keras.Input(shape=(*config.working_shape(), 1), name=f"{name}_input")
    features = scan
    for level, nb_features in enumerate(config.disc_features):
        features = SpaceToDepth3D(name=f"{name}_blocks_{level}")(features)
        features = KL.Dense(nb_features, name=f"{name}_conv_{level}")(features)
        features = KL.LeakyReLU(0.2, name=f"{name}_lrelu_{level}")(features)
    logits = KL.Conv3D(1, 3, padding="same", name=f"{name}_logits")(features)
    # float32 logits even under mixed precision, so the losses are computed in float32.
    logits = KL.Activation("linear", dtype="float32", name=f"{name}_float32")(logits)
    return tf.keras.Model(scan, logits, name=name)
