"""Fitting the segmenter: examples drawn at random (``ExampleSampler``), varied
(``synthesis``), and Adam on soft Dice + cross-entropy, within a step and a wall-time budget.

Each step draws one example: with probability ``synth_fraction`` a synthesised one (a shape
example, the atlas warped by the product's registration to an unlabelled scan, given the
appearance of a randomly chosen pseudo-labelled or labelled scan), otherwise a real scan (labelled,
or pseudo-labelled by the label transfer). A random ``patch``³ box of the working grid is cut
from it, deformed, its intensities varied, and the network takes one Adam step on

    loss = dice_weight * (1 - mean soft Dice over the labels) + cross-entropy

against the deformed label fractions (soft targets). Convolutions use the cheaper CPU gradient of
``network.use_fast_training_gradients``.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import math
import os
import time

import numpy as np
import tensorflow as tf

from ltnet_tf.config import SegmenterConfig
from ltnet_tf.segmentation import synthesis
from ltnet_tf.segmentation.network import use_fast_training_gradients

LOG_EVERY = 25


class SegmenterTrainingError(RuntimeError):
    """Training cannot go on (no examples, a non-finite loss); the message says why."""


def segmentation_loss(logits: tf.Tensor, targets: tf.Tensor, dice_weight: float) -> tuple:
    """(loss, soft Dice, cross-entropy) of ``logits`` [B, ..., L] against label fractions
    ``targets`` [B, ..., L] (summing to 1)."""
    probabilities = tf.nn.softmax(logits)
    axes = list(range(1, len(logits.shape) - 1))
    overlap = tf.reduce_sum(probabilities * targets, axes)
    total = tf.reduce_sum(probabilities + targets, axes)
    dice = tf.reduce_mean((2.0 * overlap + 1e-5) / (total + 1e-5))
    cross_entropy = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, logits))
    return dice_weight * (1.0 - dice) + cross_entropy, dice, cross_entropy


class ExampleSampler:
    """Draws examples for training: numpy picks (which example, which box, which appearance),
    ``synthesis`` varies them in TensorFlow.

    ``real``: labelled and pseudo-labelled ``synthesis.Example``s; ``shapes``: shape examples
    (the atlas warped to unlabelled scans); ``shape_statistics``: the atlas's appearance
    statistics (what a shape example's intensities are, ``synthesis.appearance_statistics``).
    Raises SegmenterTrainingError when the mix asks for a kind of example there is none of.
    """

    def __init__(self, real: list, shapes: list, shape_statistics, config: SegmenterConfig):
        if config.synth_fraction > 0 and not shapes:
            raise SegmenterTrainingError("synthesised examples asked for (synth_fraction > 0) "
                                         "but there is no shape example")
        if config.synth_fraction < 1 and not real:
            raise SegmenterTrainingError("real examples asked for (synth_fraction < 1) but there "
                                         "is no labelled or pseudo-labelled scan")
        self.real, self.shapes, self.config = real, shapes, config
        self.random = np.random.default_rng(config.seed)
        appearances = [synthesis.appearance_statistics(e.image, e.fractions) for e in real]
        self.mappings = [synthesis.appearance_mapping(shape_statistics, a) for a in appearances]
        labels = len(config.label_ids)
        self.identity = (np.ones(labels, np.float32), np.zeros(labels, np.float32))
        self.patch = [min(int(config.patch), s) for s in config.working_shape]

    def draw(self) -> tuple:
        """(name, image box [p, p, p] float32, fractions box [p, p, p, L] uint8, scale [L],
        shift [L]) of one random example."""
        synthesised = self.random.uniform() < self.config.synth_fraction
        pool = self.shapes if synthesised else self.real
        example = pool[self.random.integers(len(pool))]
        mapping, name = self.identity, example.name
        if synthesised and self.mappings:
            index = self.random.integers(len(self.mappings))
            mapping = self.mappings[index]
            name = f"{example.name} as {self.real[index].name}"
        start = [self.random.integers(s - p + 1) for s, p in zip(example.image.shape, self.patch)]
        box = tuple(slice(b, b + p) for b, p in zip(start, self.patch))
        return name, example.image[box], example.fractions[box], mapping[0], mapping[1]


class Fitter:
    """One Adam step at a time on ``model`` (a ``network.build_unet`` model)."""

    def __init__(self, model: tf.keras.Model, config: SegmenterConfig):
        self.model, self.config = model, config
        use_fast_training_gradients(model)
        self.optimizer = tf.keras.optimizers.Adam(config.learning_rate)
        self.random = tf.random.Generator.from_seed(config.seed)
        self.step = tf.function(self._step, reduce_retracing=True)

    def _step(self, image, fractions, scale, shift):
        config = self.config
        targets = tf.cast(fractions, tf.float32) / 255.0
        targets = targets / tf.maximum(tf.reduce_sum(targets, -1, keepdims=True), 1e-6)
        image = synthesis.map_appearance(image, targets, scale, shift)
        displacement = synthesis.random_displacement(self.random, image.shape.as_list(), config)
        image = synthesis.warp(image[..., None], displacement)[..., 0]
        targets = synthesis.warp(targets, displacement)
        image = synthesis.vary_intensity(self.random, image, config)
        with tf.GradientTape() as tape:
            logits = self.model(image[None, ..., None], training=True)
            loss, dice, cross_entropy = segmentation_loss(logits, targets[None],
                                                          config.dice_weight)
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, dice, cross_entropy


def fit(model: tf.keras.Model, sampler: ExampleSampler, config: SegmenterConfig,
        log=print) -> dict:
    """Train ``model`` for ``config.steps`` steps or ``config.max_minutes``, whichever comes
    first -> {'steps', 'minutes' (wall), 'cpu_minutes' (the process's, all threads: on a shared
    machine far less than the wall time times the cores), 'history': [{'step', 'loss', 'dice',
    'cross_entropy'}] (means over every ``LOG_EVERY`` steps)}. Raises SegmenterTrainingError on
    a non-finite loss."""
    fitter = Fitter(model, config)
    start, cpu_start, history, window = time.time(), _cpu_seconds(), [], []
    step = 0
    for step in range(1, config.steps + 1):
        _, image, fractions, scale, shift = sampler.draw()
        values = [float(v) for v in fitter.step(tf.constant(image), tf.constant(fractions),
                                                 tf.constant(scale), tf.constant(shift))]
        if not all(math.isfinite(v) for v in values):
            raise SegmenterTrainingError(f"segmenter training diverged at step {step} (loss "
                                         f"{values[0]}); lower --segmenter_learning_rate")
        window.append(values)
        minutes = (time.time() - start) / 60.0
        if step % LOG_EVERY == 0 or step == config.steps or minutes >= config.max_minutes:
            mean = np.mean(window, axis=0)
            history.append({"step": step, "minutes": round(minutes, 2), "loss": float(mean[0]),
                            "dice": float(mean[1]), "cross_entropy": float(mean[2])})
            window = []
            log(f"segmenter step {step}/{config.steps} ({minutes:.1f} min): loss "
                f"{mean[0]:.4f}, soft Dice {mean[1]:.4f}, cross-entropy {mean[2]:.4f}")
        if minutes >= config.max_minutes:
            break
    return {"steps": step, "minutes": (time.time() - start) / 60.0,
            "cpu_minutes": (_cpu_seconds() - cpu_start) / 60.0, "history": history}


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system
