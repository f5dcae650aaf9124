"""LTNet: one Keras model that owns G_F, G_B and D and trains them with a custom ``train_step``.

One step = a generator update (G_F and G_B, one tape) followed by a discriminator update (D, its own
tape) on the warped atlas the generator step already computed, under ``stop_gradient``: the forward
warp is computed once per step, and each update touches only its own networks' variables.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import numpy as np
import tensorflow as tf
import voxelmorph as vxm

from ltnet_tf.config import LTNetConfig
from ltnet_tf.registration import losses
from ltnet_tf.registration.networks import BackwardGenerator, ForwardGenerator, build_discriminator

# Logged names, in the paper's words; the weight of each is config.weight_<name>.
GENERATOR_TERMS = ("sim", "smooth", "adv", "cyc_img", "cyc_label", "cyc_flow", "back_sim",
                   "back_smooth")
# Terms ramped in over config.cycle_warmup_steps: each is zero when G_F is the identity, so at full
# weight from step 0 they brake G_F before it has learnt any correspondence.
WARMED_UP_TERMS = ("cyc_img", "cyc_label", "cyc_flow")


def hard_dice(reference_onehot: tf.Tensor, predicted_onehot: tf.Tensor) -> tf.Tensor:
    """Mean Dice over the foreground labels present in the reference, after argmax; shape [batch]."""
    n_labels = reference_onehot.shape[-1]
    reference = tf.one_hot(tf.argmax(reference_onehot, -1), n_labels)[..., 1:]
    predicted = tf.one_hot(tf.argmax(predicted_onehot, -1), n_labels)[..., 1:]
    overlap = tf.reduce_sum(reference * predicted, axis=[1, 2, 3])
    reference_size = tf.reduce_sum(reference, axis=[1, 2, 3])
    total = reference_size + tf.reduce_sum(predicted, axis=[1, 2, 3])
    dice = 2.0 * overlap / tf.maximum(total, 1.0)
    present = tf.cast(reference_size > 0, tf.float32)
    return tf.reduce_sum(dice * present, -1) / tf.maximum(tf.reduce_sum(present, -1), 1.0)


class LTNet(tf.keras.Model):
    """LT-Net (Wang et al., CVPR 2020) over one atlas.

    ``atlas``: [1, *working_shape, 1] normalised atlas image; ``atlas_onehot``: [1, *working_shape, L]
    its label map as (soft) one-hot at the working resolution. Training data are batches of scans
    [B, *working_shape, 1]; validation data are ``(scan, scan_onehot)`` pairs.
    """

    def __init__(self, config: LTNetConfig, atlas: np.ndarray, atlas_onehot: np.ndarray, **kwargs):
        super().__init__(name="ltnet", **kwargs)
        self.ltnet_config = config.validate()
        shape = tuple(config.working_shape())
        if tuple(atlas.shape) != (1, *shape, 1) or tuple(atlas_onehot.shape[:-1]) != (1, *shape):
            raise ValueError(f"atlas {atlas.shape} / atlas_onehot {atlas_onehot.shape} do not match "
                             f"the working shape {shape} of the config")
        self.atlas = tf.constant(atlas, tf.float32)
        self.atlas_onehot = tf.constant(atlas_onehot, tf.float32)

        self.forward_generator = ForwardGenerator.from_ltnet_config(config)
        self.backward_generator = (BackwardGenerator.from_ltnet_config(config)
                                   if config.uses_backward_generator else None)
        self.discriminator = build_discriminator(config) if config.uses_discriminator else None
        self.warp = vxm.layers.SpatialTransformer(fill_value=None, name="label_warp")
        # Not self.warp again: VoxelMorph 0.2's SpatialTransformer fixes its input's channel count
        # when first built (it reshapes to it), and the labels have L channels, the image one.
        self.image_warp = vxm.layers.SpatialTransformer(fill_value=None, name="image_warp")

        self.ncc = losses.LocalNCC(config.ncc_window)
        self.adversarial = losses.Adversarial(config.gan_mode)
        self.active_terms = tuple(t for t in GENERATOR_TERMS if self._term_is_logged(t))
        self.trackers = {name: tf.keras.metrics.Mean(name=name)
                         for name in (*self.active_terms, "g_loss")}
        if self.discriminator is not None:
            self.trackers["d_loss"] = tf.keras.metrics.Mean(name="d_loss")
        self.dice_tracker = tf.keras.metrics.Mean(name="dice")
        # The steps return tracker results, already reduced over all replicas; Keras's default
        # ('auto' = sum) would add them up again across workers, logging N times the loss.
        self.distribute_reduction_method = "first"

    def _term_is_logged(self, term: str) -> bool:
        # sim and smooth are always logged (they describe the registration even at weight 0).
        return term in ("sim", "smooth") or getattr(self.ltnet_config, f"weight_{term}") > 0

    # ------------------------------------------------------------------ Keras plumbing
    def compile(self, g_optimizer=None, d_optimizer=None, **kwargs):
        """One Adam per side by default, learning rates from the config."""
        super().compile(**kwargs)
        config = self.ltnet_config
        self.g_optimizer = self._loss_scaled(
            g_optimizer or tf.keras.optimizers.Adam(config.g_learning_rate))
        self.d_optimizer = None
        if self.discriminator is not None:
            self.d_optimizer = self._loss_scaled(
                d_optimizer or tf.keras.optimizers.Adam(config.d_learning_rate))
        # Adam's moments made now rather than in the first train step: a tf.function that makes
        # variables on its first call is traced twice (with and without making them), and tracing
        # the train step is most of what a run spends before its first step.
        self.g_optimizer.build(self.generator_variables)
        if self.d_optimizer is not None:
            self.d_optimizer.build(self.discriminator.trainable_variables)

    @staticmethod
    def _loss_scaled(optimizer):
        """Under mixed_float16, losses averaged over millions of voxels give float16 gradients that
        underflow; Keras scales only the optimizer given to ``Model.compile``, so we do it here."""
        policy = tf.keras.mixed_precision.global_policy()
        if policy.compute_dtype == "float16" and not isinstance(
                optimizer, tf.keras.mixed_precision.LossScaleOptimizer):
            return tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
        return optimizer

    @staticmethod
    def _apply(optimizer, tape, loss, variables):
        scaled = isinstance(optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
        gradients = tape.gradient(optimizer.get_scaled_loss(loss) if scaled else loss, variables)
        if scaled:
            gradients = optimizer.get_unscaled_gradients(gradients)
        optimizer.apply_gradients(zip(gradients, variables))

    @property
    def metrics(self):
        return [*self.trackers.values(), self.dice_tracker]

    @property
    def generator_variables(self):
        variables = list(self.forward_generator.trainable_variables)
        if self.backward_generator is not None:
            variables += self.backward_generator.trainable_variables
        return variables

    def _atlas_batch(self, scan):
        batch = tf.shape(scan)[0]
        return (tf.repeat(self.atlas, batch, axis=0),
                tf.repeat(self.atlas_onehot, batch, axis=0))

    def call(self, scan, training=False):
        """Scan batch -> (warped atlas ū, forward displacement Δp_F) at the working resolution."""
        atlas, _ = self._atlas_batch(scan)
        warped_atlas, forward_flow = self.forward_generator([atlas, scan], training=training)
        return warped_atlas, forward_flow

    # ------------------------------------------------------------------ losses
    def generator_terms(self, scan, training=True):
        """Every active generator term (per example), the warped atlas and the forward displacement."""
        config = self.ltnet_config
        atlas, atlas_onehot = self._atlas_batch(scan)
        warped_atlas, forward_flow = self.forward_generator([atlas, scan], training=training)
        terms = {"sim": self.ncc(scan, warped_atlas), "smooth": losses.smoothness(forward_flow)}
        if self.discriminator is not None:
            terms["adv"] = self.adversarial.generator_loss(self.discriminator(warped_atlas))
        if self.backward_generator is not None:
            # G_B registers ū back to x. Its own losses (back_sim, back_smooth) train G_B alone:
            # ū is its input data, under stop_gradient. Otherwise back_sim, whose gradient into
            # G_F pulls ū towards x at full weight while G_B is still near the identity, would
            # cancel L_sim and hold G_F near the identity (measured: README, "Benchmarks").
            cycled_atlas, backward_flow = self.backward_generator(
                [tf.stop_gradient(warped_atlas), atlas], training=training)
            if config.weight_back_sim > 0:
                terms["back_sim"] = self.ncc(atlas, cycled_atlas)
            if config.weight_back_smooth > 0:
                terms["back_smooth"] = losses.smoothness(backward_flow)
            if any(getattr(config, f"weight_{t}") > 0 for t in WARMED_UP_TERMS):
                # The cycle terms supervise both generators through the composed displacement
                # c = Δp_F∘Δp_B: x̄ = ū∘Δp_B = x∘c, and the labels carried forward then back are
                # y_x∘c (one interpolation each, not two).
                composed = losses.compose_displacements(forward_flow, backward_flow)
                if config.weight_cyc_img > 0:
                    terms["cyc_img"] = losses.image_cycle(atlas, self.image_warp([atlas, composed]))
                if config.weight_cyc_flow > 0:
                    terms["cyc_flow"] = losses.displacement_norm(composed)
                if config.weight_cyc_label > 0:
                    cycled_labels = self.warp([atlas_onehot, composed])
                    terms["cyc_label"] = losses.soft_dice_loss(atlas_onehot, cycled_labels)
        return terms, warped_atlas, forward_flow

    def cycle_ramp(self):
        """Factor in [0, 1] on the cycle terms' weights: (step + 1) / cycle_warmup_steps, capped."""
        warmup = self.ltnet_config.cycle_warmup_steps
        if warmup == 0:
            return tf.constant(1.0)
        step = tf.cast(self.g_optimizer.iterations, tf.float32)
        return tf.minimum(1.0, (step + 1.0) / float(warmup))

    def weighted_total(self, terms):
        config = self.ltnet_config
        ramp = self.cycle_ramp()
        return tf.add_n([getattr(config, f"weight_{name}") * value
                         * (ramp if name in WARMED_UP_TERMS else 1.0)
                         for name, value in terms.items()])

    # ------------------------------------------------------------------ the two updates
    def generator_step(self, scan):
        """Update G_F (and G_B) only; returns the terms and the warped atlas for the D step."""
        with tf.GradientTape() as tape:
            terms, warped_atlas, _ = self.generator_terms(scan, training=True)
            per_example = self.weighted_total(terms)
            # Average over the global batch: replicas' gradients are summed by the optimizer.
            g_loss = tf.nn.compute_average_loss(per_example)
        self._apply(self.g_optimizer, tape, g_loss, self.generator_variables)
        terms["g_loss"] = per_example
        return terms, warped_atlas

    def discriminator_step(self, scan, warped_atlas):
        """Update D only, on real scans against (constant) warped atlases."""
        fake = tf.stop_gradient(warped_atlas)
        with tf.GradientTape() as tape:
            # Real and fake in one pass of D (one batch, half the kernel launches).
            logits = self.discriminator(tf.concat([scan, tf.cast(fake, scan.dtype)], 0),
                                        training=True)
            real_logits, fake_logits = tf.split(logits, 2, axis=0)
            per_example = self.adversarial.discriminator_loss(real_logits, fake_logits)
            d_loss = tf.nn.compute_average_loss(per_example)
        self._apply(self.d_optimizer, tape, d_loss, self.discriminator.trainable_variables)
        return per_example

    def train_step(self, scan):
        if isinstance(scan, (tuple, list)):
            scan = scan[0]
        terms, warped_atlas = self.generator_step(scan)
        if self.discriminator is not None:
            terms["d_loss"] = self.discriminator_step(scan, warped_atlas)
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def test_step(self, data):
        """Validation: every active term, plus Dice of the transferred labels when labels are given."""
        scan, scan_onehot, _ = tf.keras.utils.unpack_x_y_sample_weight(data)
        terms, _, forward_flow = self.generator_terms(scan, training=False)
        terms["g_loss"] = self.weighted_total(terms)
        for name, value in terms.items():
            self.trackers[name].update_state(value)
        results = {name: self.trackers[name].result() for name in terms}
        if scan_onehot is not None:
            _, atlas_onehot = self._atlas_batch(scan)
            self.dice_tracker.update_state(hard_dice(scan_onehot, self.warp([atlas_onehot,
                                                                             forward_flow])))
            results["dice"] = self.dice_tracker.result()
        return results
