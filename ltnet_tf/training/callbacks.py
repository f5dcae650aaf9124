"""The callbacks of a training run: stop at the planned step, log progress, guard against
divergence, validate and checkpoint (keeping the best), and the validation itself.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import math
import time

import numpy as np
import tensorflow as tf
from absl import logging

from ltnet_tf.config import LTNetConfig
from ltnet_tf.io import evaluation, labels as label_names
from ltnet_tf.registration.transfer import LabelTransfer


class TrainingError(ValueError):
    """The run cannot start or go on as asked (e.g. a checkpoint cannot be saved); one line."""


class DivergenceError(TrainingError):
    """Training produced a non-finite loss or weights; the message says what to change."""


class StopAtStep(tf.keras.callbacks.Callback):
    def __init__(self, optimizer, steps):
        super().__init__()
        self.optimizer, self.steps = optimizer, steps

    def on_train_batch_end(self, batch, logs=None):
        if int(self.optimizer.iterations.numpy()) >= self.steps:
            self.model.stop_training = True


class ProgressLog(tf.keras.callbacks.Callback):
    """One log line every ``interval_s`` seconds: Keras's bar redraws in place, which a log file
    (``nohup``, a cluster job) shows only at the end of each epoch."""

    def __init__(self, optimizer, steps, interval_s=30.0):
        super().__init__()
        self.optimizer, self.steps, self.interval_s = optimizer, steps, interval_s
        self.last_time = self.last_step = None

    def on_epoch_begin(self, epoch, logs=None):
        self.last_time = None  # the rate should not count the validation between epochs

    def on_train_batch_end(self, batch, logs=None):
        step, now = int(self.optimizer.iterations.numpy()), time.time()
        if self.last_time is None:
            self.last_time, self.last_step = now, step
        elif now - self.last_time >= self.interval_s or step >= self.steps:
            rate = (now - self.last_time) / max(step - self.last_step, 1)
            losses = " ".join(f"{k}={float(v):.4f}" for k, v in (logs or {}).items())
            logging.info("step %d/%d (%.2f s/step, ~%.0f min left) %s", step, self.steps, rate,
                         rate * (self.steps - step) / 60, losses)
            self.last_time, self.last_step = now, step


def weights_are_usable(model) -> bool:
    """Every weight finite, and G_F gives a finite displacement on the atlas.

    Finite weights are not enough: a learning rate of 1e30 gives weights of ~1e30 that overflow in
    the first convolution. One forward pass per checkpoint costs nothing next to the steps between.
    """
    try:
        if not all(bool(tf.reduce_all(tf.math.is_finite(v))) for v in model.variables
                   if v.dtype.is_floating):
            return False
        _, forward_flow = model(model.atlas, training=False)
        return bool(tf.reduce_all(tf.math.is_finite(forward_flow)))
    except tf.errors.InvalidArgumentError:  # a NaN displacement becomes an out-of-range gather
        return False


class DivergenceGuard(tf.keras.callbacks.Callback):
    """Stops training at the first non-finite logged loss (Keras fetches them every step anyway,
    so the check costs nothing), and tells ``Checkpointing`` not to save weights that diverged."""

    def __init__(self, step_variable):
        super().__init__()
        self.step_variable = step_variable
        self.diverged_at = None  # the step, once training diverged
        self.reason = None

    def stop(self, reason):
        if self.diverged_at is None:
            self.diverged_at, self.reason = int(self.step_variable.numpy()), reason
        self.model.stop_training = True

    def on_train_batch_end(self, batch, logs=None):
        bad = sorted(k for k, v in (logs or {}).items() if not math.isfinite(float(v)))
        if bad:
            self.stop(f"non-finite {', '.join(bad)}")

    def usable(self) -> bool:
        if self.diverged_at is None and not weights_are_usable(self.model):
            self.stop("non-finite weights or displacement")
        return self.diverged_at is None


class Checkpointing(tf.keras.callbacks.Callback):
    """Every ``checkpoint_every`` steps (one Keras epoch): validate, checkpoint, keep the best.

    Nothing is validated or saved once ``guard`` says the weights diverged: the newest checkpoint
    stays the last good one, for ``--resume`` and ``predict.py``.
    """

    def __init__(self, manager, best_manager, step_variable, model_dir, validator=None,
                 chief=True, guard=None):
        super().__init__()
        self.manager, self.best_manager = manager, best_manager
        self.step_variable, self.validator = step_variable, validator
        self.model_dir, self.chief, self.guard = model_dir, chief, guard
        # A resumed run must beat the best so far, not -1 (a worker reads its own scratch copy).
        self.best_dice = model_dir.best_validation_dice(best_manager.directory)

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.step_variable.numpy())
        if self.guard is not None and not self.guard.usable():
            return
        if self.validator is not None:
            dice = self.validator()
            logs["val_dice"] = dice
            logging.info("step %d: validation mean Dice %.4f", step, dice)
            if self.chief:
                self.model_dir.append_validation(step, dice)
            if dice > self.best_dice:
                self.best_dice = dice
                self.best_manager.save_step(step)
                self.model_dir.record_best(step, dice, self.best_manager.directory)
        self.manager.save_step(step)


class CheckpointSaver(tf.train.CheckpointManager):
    """A CheckpointManager that saves each step's ``ckpt-<step>`` once, and reports an I/O error
    as a one-line TrainingError naming the folder (the checkpoints already there stay usable).

    Saved steps are counted here, not read from the manager's "latest": after a resume that
    skipped a damaged newest checkpoint, that one must be written again when its step comes.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_steps = set()

    def save_step(self, step: int) -> None:
        if step in self.saved_steps:
            return
        try:
            self.save(checkpoint_number=step)
        except (OSError, tf.errors.OpError) as e:
            reason = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
            raise TrainingError(f"{self.directory}: cannot save checkpoint ckpt-{step} "
                                f"({str(reason).strip().splitlines()[0]})") from None
        self.saved_steps.add(step)


class Validator:
    """Mean Dice of full-resolution label transfer on labelled validation scans."""

    def __init__(self, label_transfer: LabelTransfer, pairs, config: LTNetConfig):
        self.label_transfer = label_transfer
        self.pairs = pairs
        self.labels = evaluation.evaluation_labels(config.label_ids, label_names.BENCHMARK_LABELS)

    def __call__(self) -> float:
        scores = []
        for scan, reference in self.pairs:
            segmentation = self.label_transfer(scan.data[None, ..., None])["segmentation"][0].numpy()
            per_label = evaluation.dice_per_label(segmentation, reference.data, self.labels)
            scores.append(evaluation.mean_dice(per_label, self.labels))
        return float(np.mean(scores))
