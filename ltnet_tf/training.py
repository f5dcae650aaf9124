"""Training a run: inputs checked, config resolved and saved, fit with checkpoints, validation,
TensorBoard and progress, then export and a QC picture. ``cli.train_main`` is a thin layer on this.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import atexit
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from absl import logging

from ltnet_tf import alignment, data, evaluation, labels as label_names, signals
from ltnet_tf.config import RESUME_CHANGEABLE, LTNetConfig
from ltnet_tf.inference import LabelTransfer
from ltnet_tf.model import LTNet
from ltnet_tf.modeldir import ModelDir, ModelDirError, checkpoint_problem, checkpoints_newest_first


class TrainingError(ValueError):
    """The run cannot start as asked (e.g. folder already holds a run); one-line message."""


class DivergenceError(TrainingError):
    """Training produced a non-finite loss or weights; the message says what to change."""


# ------------------------------------------------------------------------------- distribution
def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    return resolver.task_type == "chief" or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def _writable_dir(path: str, chief: bool) -> str:
    """Chief writes to ``path``; every other worker saves its (identical) copy into a temp folder
    that is removed when the process exits: all workers save, so a save that needs a collective
    (SyncOnRead state) never hangs, and only the chief's copy is kept."""
    if chief:
        return path
    temp = tempfile.mkdtemp(prefix="ltnet_worker_")
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    return temp


# ------------------------------------------------------------------------------- inputs
def check_inputs(atlas_path, atlas_labels_path, scan_paths, align: str = "auto"):
    """Load atlas + labels, list and check every scan (one at a time). With ``align='auto'`` a scan
    on another grid is replaced by its aligned copy on the atlas grid (cached, see alignment.py)."""
    atlas = data.load_scan(atlas_path)
    atlas_labels = data.load_label_map(atlas_labels_path)
    data.check_same_grid(atlas, atlas_labels, strict=True)
    paths = data.list_images(scan_paths)
    for path in paths:
        scan = data.load_scan(path)  # values checked: finite, 3D, not constant
        if align == "never" or alignment.on_atlas_grid(atlas, scan):
            data.check_same_grid(atlas, scan, strict=False)
    if align == "auto":
        paths = alignment.align_training_scans(atlas, atlas_path, paths)
    return atlas, atlas_labels, paths


def align_validation_pairs(atlas: data.Volume, pairs, align: str = "auto") -> list:
    """Validation scans on other grids aligned to the atlas, their labels resampled by nearest
    label (validation Dice is then measured on the atlas grid, as for pre-aligned scans)."""
    aligner, aligned_pairs = None, []
    for scan, labels in pairs:
        if align == "never" or alignment.on_atlas_grid(atlas, scan):
            data.check_same_grid(atlas, scan, strict=False)
            aligned_pairs.append((scan, labels))
            continue
        aligner = aligner or alignment.AtlasAligner(atlas)
        found = aligner.align(scan)
        logging.info("validation scan %s aligned to the atlas in %.1f s (brain overlap %.2f)",
                     os.path.basename(scan.path), found.seconds, found.brain_overlap)
        aligned_pairs.append((found.resample_scan(scan), found.resample_labels(labels)))
    return aligned_pairs


def resolve_config(config: LTNetConfig, atlas: data.Volume, atlas_labels: data.Volume) -> LTNetConfig:
    # Background (0) first, even when absent from the map or when negative IDs sort before it.
    label_ids = [0, *sorted(int(i) for i in np.unique(atlas_labels.data) if i != 0)]
    return config.replace(atlas_shape=list(atlas.shape), label_ids=label_ids)


# ------------------------------------------------------------------------------- callbacks
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


def weights_are_usable(model: LTNet) -> bool:
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

    def __init__(self, manager, best_manager, step_variable, validator=None, history_path=None,
                 guard=None):
        super().__init__()
        self.manager, self.best_manager = manager, best_manager
        self.step_variable, self.validator = step_variable, validator
        self.guard = guard
        self.best_record = os.path.join(best_manager.directory, "best.json")
        # Every validation, appended: the Dice-vs-steps curve of the run.
        self.history_path = history_path
        self.best_dice = -1.0
        if os.path.isfile(self.best_record):  # resumed run: beat the best so far, not -1
            with open(self.best_record) as f:
                self.best_dice = json.load(f)["val_dice"]

    def on_epoch_end(self, epoch, logs=None):
        step = int(self.step_variable.numpy())
        if self.guard is not None and not self.guard.usable():
            return
        if self.validator is not None:
            dice = self.validator()
            logs["val_dice"] = dice
            logging.info("step %d: validation mean Dice %.4f", step, dice)
            self._append_history(step, dice)
            if dice > self.best_dice:
                self.best_dice = dice
                self.best_manager.save_step(step)
                with open(self.best_record + ".tmp", "w") as f:
                    json.dump({"step": step, "val_dice": dice}, f)
                os.replace(self.best_record + ".tmp", self.best_record)
        self.manager.save_step(step)

    def _append_history(self, step, dice):
        if self.history_path is None:
            return
        history = []
        if os.path.isfile(self.history_path):
            with open(self.history_path) as f:
                history = [r for r in json.load(f) if r["step"] < step]  # drop a resumed tail
        history.append({"step": step, "val_dice": dice, "time": time.time()})
        with open(self.history_path + ".tmp", "w") as f:
            json.dump(history, f, indent=1)
        os.replace(self.history_path + ".tmp", self.history_path)


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


# ------------------------------------------------------------------------------- the run
def build_model(config: LTNetConfig, atlas: data.Volume, atlas_labels: data.Volume) -> LTNet:
    atlas_working = data.preprocess_scan(atlas.data, config)[None]
    indices = data.labels_to_indices(atlas_labels.data, config.label_ids)
    onehot = data.atlas_onehot_working(indices, len(config.label_ids), config)[None]
    model = LTNet(config, atlas_working, onehot)
    model.compile(jit_compile=config.jit_compile)
    return model


def make_checkpoint(model: LTNet) -> tf.train.Checkpoint:
    """Flat keys, so G_F alone can be restored with ``Checkpoint(forward_generator=...)``."""
    parts = dict(forward_generator=model.forward_generator, g_optimizer=model.g_optimizer)
    if model.backward_generator is not None:
        parts["backward_generator"] = model.backward_generator
    if model.discriminator is not None:
        parts.update(discriminator=model.discriminator, d_optimizer=model.d_optimizer)
    return tf.train.Checkpoint(**parts)


def prepare_run_folder(config: LTNetConfig, model_dir: ModelDir, atlas, atlas_labels,
                       resume: bool) -> LTNetConfig:
    """New run: write config and atlas copies. Resume: the saved config wins, but for the fields
    that may change mid-run (``RESUME_CHANGEABLE``); it is written only once the checkpoint is
    restored (``train``), so a resume that fails leaves config.json as it was."""
    if resume:
        model_dir.check()
        saved = model_dir.load_config()
        if saved.atlas_shape != config.atlas_shape or saved.label_ids != config.label_ids:
            raise TrainingError(f"{model_dir.path}: --resume with a different atlas than the run's")
        return saved.replace(**{name: getattr(config, name) for name in RESUME_CHANGEABLE})
    # A config without checkpoint or export is a start that failed (e.g. a scan that went bad in
    # tf.data before the first checkpoint): it may be started again, as it could never be resumed.
    if os.path.exists(model_dir.config_path) and (tf.train.latest_checkpoint(model_dir.checkpoint_dir)
                                                  or model_dir.saved_model_versions()):
        raise TrainingError(f"{model_dir.path}: folder already holds a run; pass --resume to "
                            f"continue it or choose another --model_dir")
    try:
        os.makedirs(model_dir.path, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{model_dir.path}: cannot create model folder ({e.strerror})") from None
    if not os.access(model_dir.path, os.W_OK):
        raise TrainingError(f"{model_dir.path}: model folder is not writable")
    data.save_nifti(atlas.data, atlas.affine, model_dir.atlas_path, header=atlas.header)
    data.save_nifti(atlas_labels.data, atlas_labels.affine, model_dir.atlas_labels_path,
                    header=atlas_labels.header)
    config.save(model_dir.config_path)
    return config


def train(config: LTNetConfig, atlas_path, atlas_labels_path, scan_paths, model_dir, *,
          val_images=None, val_labels=None, resume: bool = False, strategy=None,
          export: bool = True, verbose: int = 1, align: str = "auto",
          stop_request: signals.StopRequest = None) -> ModelDir:
    """Train LT-Net; returns the run folder. Raises DataError / TrainingError on bad input.

    ``align='auto'``: scans and validation scans on other grids than the atlas's are aligned to it
    first; ``'never'``: every scan must be on the atlas grid. ``stop_request`` (from
    ``signals.stop_on_signals``): a stop signal during training saves the current step and raises
    ``signals.Stopped``."""
    strategy = strategy or tf.distribute.get_strategy()
    chief = is_chief(strategy)
    if config.batch_size % strategy.num_replicas_in_sync:
        raise TrainingError(f"batch_size {config.batch_size} is the global batch: make it a "
                            f"multiple of the {strategy.num_replicas_in_sync} replicas in sync")
    model_dir = ModelDir(model_dir)
    atlas, atlas_labels, scan_paths = check_inputs(atlas_path, atlas_labels_path, scan_paths,
                                                   align)
    pairs = data.load_validation_pairs(val_images, val_labels) if val_images else []
    pairs = align_validation_pairs(atlas, pairs, align)
    config = resolve_config(config, atlas, atlas_labels)
    if chief:
        config = prepare_run_folder(config, model_dir, atlas, atlas_labels, resume)
    elif resume:
        config = model_dir.load_config().replace(
            **{name: getattr(config, name) for name in RESUME_CHANGEABLE})
    saved_config = model_dir.load_config() if resume and chief else None  # not yet rewritten
    tf.keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")

    with strategy.scope():
        model = build_model(config, atlas, atlas_labels)
        checkpoint = make_checkpoint(model)
    steps_done = 0
    manager = CheckpointSaver(checkpoint, _writable_dir(model_dir.checkpoint_dir, chief),
                              max_to_keep=3)
    best_manager = CheckpointSaver(
        checkpoint, _writable_dir(model_dir.best_checkpoint_dir, chief), max_to_keep=1)
    status = None
    if resume:
        latest = newest_intact_checkpoint(model_dir)
        status = checkpoint.restore(latest)
        status.assert_existing_objects_matched()
        # The checkpoint holds the optimisers' learning rates; the config's may have been changed.
        model.g_optimizer.learning_rate = config.g_learning_rate
        if model.d_optimizer is not None:
            model.d_optimizer.learning_rate = config.d_learning_rate
        steps_done = int(model.g_optimizer.iterations.numpy())
        logging.info("resuming %s at step %d from %s", model_dir.path, steps_done, latest)
        if chief:
            config.save(model_dir.config_path)
    if steps_done >= config.steps:
        logging.info("run already has %d >= %d steps; nothing to train", steps_done, config.steps)
        if status is not None:  # optimiser slots are never built: no warning for each of them
            status.expect_partial()
    else:
        try:
            _fit(model, config, scan_paths, pairs, atlas, atlas_labels, model_dir, manager,
                 best_manager, steps_done, strategy, chief, verbose, stop_request)
        except DivergenceError:
            if status is not None and chief and not manager.saved_steps:
                saved_config.save(model_dir.config_path)  # its checkpoints' settings, not these
            raise
    if chief and export:
        if steps_done >= config.steps and is_exported(model_dir):
            logging.info("%s is already exported from its checkpoint; not exporting again",
                         model_dir.latest_saved_model())
        else:
            finish_run(model_dir, config, pairs, scan_paths)
    return model_dir


def newest_intact_checkpoint(model_dir: ModelDir) -> str:
    """The newest checkpoint of the run that reads back whole; a damaged newer one is skipped
    with a warning (it is overwritten when training reaches its step again)."""
    candidates = checkpoints_newest_first(model_dir.checkpoint_dir)
    if not candidates:
        raise ModelDirError(f"{model_dir.path}: nothing to resume (no checkpoint)")
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logging.warning("%s: damaged checkpoint, skipped (%s)", path, problem)
    raise ModelDirError(f"{model_dir.checkpoint_dir}: nothing to resume, every checkpoint is "
                        f"damaged ({', '.join(os.path.basename(p) for p in candidates)})")


def is_exported(model_dir: ModelDir) -> bool:
    """The newest SavedModel and generator.h5 exist and come from the checkpoint an export would
    use now, so exporting again would only add an identical version."""
    from ltnet_tf import export
    saved_model = model_dir.latest_saved_model()
    if saved_model is None or not os.path.isfile(model_dir.generator_h5_path):
        return False
    try:
        with open(os.path.join(saved_model, export.METADATA_PATH)) as f:
            exported_from = json.load(f)["checkpoint"]
        return exported_from == os.path.relpath(model_dir.checkpoint("auto"), model_dir.path)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _fit(model, config, scan_paths, pairs, atlas, atlas_labels, model_dir, manager, best_manager,
         steps_done, strategy, chief, verbose, stop_request=None):
    dataset = data.make_training_dataset(scan_paths, config, skip_batches=steps_done)
    validator = None
    if pairs:
        label_transfer = LabelTransfer(model.forward_generator, config, atlas.data, atlas_labels.data)
        validator = Validator(label_transfer, pairs, config)
    guard = DivergenceGuard(model.g_optimizer.iterations)
    callbacks = [guard, StopAtStep(model.g_optimizer, config.steps),
                 Checkpointing(manager, best_manager, model.g_optimizer.iterations, validator,
                               model_dir.validation_history_path if chief else None, guard)]
    if stop_request is not None:
        callbacks.append(signals.StopAtSignal(stop_request, _saver_of_current_step(manager, guard),
                                              strategy))
    if chief:
        callbacks.append(tf.keras.callbacks.TensorBoard(model_dir.log_dir, update_freq=10))
        if verbose and not sys.stdout.isatty():
            callbacks.append(ProgressLog(model.g_optimizer, config.steps))
            verbose = 2  # one line per checkpoint interval instead of an in-place bar
    every = config.checkpoint_every
    start = time.time()
    try:
        model.fit(dataset, steps_per_epoch=every, epochs=math.ceil(config.steps / every),
                  initial_epoch=steps_done // every, callbacks=callbacks, verbose=verbose)
    except tf.errors.InvalidArgumentError:
        # Weights that overflowed give a NaN displacement, which VoxelMorph's warp turns into an
        # out-of-range index (-2147483648) before any loss is logged.
        guard.set_model(model)
        if guard.usable():
            raise  # not a divergence: a bug, shown in full
    if guard.diverged_at is not None:
        raise DivergenceError(divergence_message(model_dir, config, guard))
    logging.info("trained %d steps in %.0f s", config.steps - steps_done, time.time() - start)
    manager.save_step(int(model.g_optimizer.iterations.numpy()))


def _saver_of_current_step(manager: CheckpointSaver, guard: DivergenceGuard):
    """For a stop on a signal: a function that saves the current step and returns it, or returns
    None when the weights diverged or the save failed (then the newest checkpoint stays)."""
    def save():
        if not guard.usable():
            return None
        step = int(guard.step_variable.numpy())
        try:
            manager.save_step(step)
        except TrainingError as e:
            logging.warning("%s", e)
            return None
        return step

    return save


def stopped_message(model_dir: ModelDir, interrupt: KeyboardInterrupt) -> str:
    """One line for a run stopped by Ctrl-C or a signal (``signals.Stopped``): the checkpoint
    ``--resume`` continues from, and the command."""
    signum = signals.signal_number(interrupt)
    how = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "stopped")
    how = f"{how} ({signal.Signals(signum).name})"
    resume = f"python train.py --resume --model_dir {model_dir.path} (and the same data flags)"
    step = getattr(interrupt, "step", None)
    if step is not None:
        return f"{how} at step {step}: saved ckpt-{step}; continue from it with {resume}"
    try:
        last = os.path.basename(newest_intact_checkpoint(model_dir))
    except ModelDirError:
        return f"{how} before the first checkpoint of {model_dir.path}: nothing to resume"
    return f"{how}, nothing saved after {last}: continue from it with {resume}"


def divergence_message(model_dir: ModelDir, config: LTNetConfig, guard: DivergenceGuard) -> str:
    """One line: where it diverged, which checkpoint is still good, and what to change."""
    last_good = tf.train.latest_checkpoint(model_dir.checkpoint_dir)
    advice = (f"lower --g_learning_rate (now {config.g_learning_rate:g}) or --d_learning_rate "
              f"(now {config.d_learning_rate:g})")
    if last_good is None:
        return (f"{model_dir.path}: training diverged at step {guard.diverged_at} ({guard.reason}) "
                f"before the first checkpoint; {advice} and train again")
    return (f"{model_dir.path}: training diverged at step {guard.diverged_at} ({guard.reason}); "
            f"nothing was saved after {os.path.basename(last_good)}, the last good checkpoint: "
            f"{advice} and continue from it with --resume")


def finish_run(model_dir: ModelDir, config: LTNetConfig, pairs, scan_paths) -> None:
    """Export (SavedModel + VoxelMorph .h5) and draw the QC picture from the exported model."""
    from ltnet_tf import export, qc  # heavy imports only at the end of a run
    # Exports are float32 whatever the training precision (serving inputs and tests are float32).
    tf.keras.mixed_precision.set_global_policy("float32")
    export.export_all(model_dir)
    generator = model_dir.restore_forward_generator(config)
    atlas, atlas_labels = model_dir.load_atlas()
    label_transfer = LabelTransfer(generator, config, atlas.data, atlas_labels.data)
    scan = pairs[0][0] if pairs else data.load_scan(scan_paths[0])
    segmentation = label_transfer(scan.data[None, ..., None])["segmentation"][0].numpy()
    qc.save_qc_png(scan.data, segmentation, model_dir.qc_path,
                   title=f"{os.path.basename(scan.path)}: transferred atlas labels")
