"""Training a run: inputs checked, config resolved, fit with checkpoints, validation, TensorBoard
and progress, then export and a QC picture. ``cli.train_main`` is a thin layer on this; the run
folder is ``ltnet_tf.serving.modeldir.ModelDir``'s, the callbacks are ``ltnet_tf.training.callbacks``'.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import math
import os
import signal
import sys
import time

import numpy as np
import tensorflow as tf
from absl import logging

from ltnet_tf.config import LTNetConfig
from ltnet_tf.io import volumes as data
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.io.pairs import load_validation_pairs
from ltnet_tf.preprocessing.preparation import ScanPreparation
from ltnet_tf.registration import alignment
from ltnet_tf.registration.atlases import AtlasSet
from ltnet_tf.registration.transfer import LabelTransfer
from ltnet_tf.serving.modeldir import ModelDir
from ltnet_tf.training import alignment_cache, distribute, signals
from ltnet_tf.training.callbacks import (CheckpointSaver, Checkpointing, DivergenceError,
                                         DivergenceGuard, ProgressLog, StopAtStep, TrainingError,
                                         Validator)
from ltnet_tf.training.dataset import make_training_dataset
from ltnet_tf.training.model import LTNet

__all__ = ["train", "TrainingError", "DivergenceError", "check_inputs", "resolve_config"]


# ------------------------------------------------------------------------------- inputs
def check_inputs(atlas_path, atlas_labels_path, scan_paths, align: str = "auto",
                 preparation: ScanPreparation = None):
    """Load atlas + labels, list and check every scan (one at a time). With ``align='auto'`` a scan
    on another grid is replaced by its aligned copy on the atlas grid, and with ``preparation`` a
    whole head by its skull-stripped, N4-corrected copy (both cached, ``alignment_cache``).
    Raises DataError naming a file, ConfigError when heads need an extractor not installed."""
    atlas = data.load_scan(atlas_path)
    atlas_labels = data.load_label_map(atlas_labels_path)
    data.check_same_grid(atlas, atlas_labels, strict=True)
    paths, heads = data.list_images(scan_paths), set()
    for path in paths:
        scan = data.load_scan(path)  # values checked: finite, 3D, not constant
        if preparation is not None and (preparation.check(scan)
                                        or preparation.options.bias_correction == "yes"):
            heads.add(path)  # stripped and/or corrected; a head's tissue checked by check()
        if align == "never" or alignment.on_atlas_grid(atlas, scan):
            data.check_same_grid(atlas, scan, strict=False)
    if align == "auto" or heads:
        paths = alignment_cache.align_training_scans(atlas, atlas_path, paths,
                                                     preparation=preparation, prepare=heads,
                                                     align=align == "auto")
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


def train(config: LTNetConfig, atlas_path, atlas_labels_path, scan_paths, model_dir, *,
          val_images=None, val_labels=None, resume: bool = False, strategy=None,
          export: bool = True, verbose: int = 1, align: str = "auto",
          label_names: str = None, extra_atlases=(),
          stop_request: signals.StopRequest = None,
          preparation: ScanPreparation = None) -> ModelDir:
    """Train LT-Net; returns the run folder (see ``ltnet_tf.serving.modeldir`` for what it holds).

    ``align='auto'``: scans and validation scans on other grids than the atlas's are aligned to it
    first; ``'never'``: every scan must be on the atlas grid. ``resume``: continue the run in
    ``model_dir`` from its newest intact checkpoint, with ``config``'s ``RESUME_CHANGEABLE``
    fields. ``label_names``: a FreeSurfer LUT, ITK-SNAP label file or BIDS dseg.tsv naming the
    atlas's structures, kept in the run folder (``label_names.json``) for prediction and export.
    ``extra_atlases``: [(image, label map)] of further labelled scans, checked now (label IDs,
    alignment to the atlas) and kept in the run folder (``atlases/``); G_F learns the atlas, and
    predict.py registers every atlas to each scan and fuses their labels.
    ``stop_request`` (from ``signals.stop_on_signals``): a stop signal (SIGTERM from a scheduler,
    Ctrl-C) during training saves the current step and raises ``signals.Stopped``.
    ``preparation``: whole heads among the unlabelled scans are skull-stripped and N4-corrected
    as predict.py does (``--skull_strip``, ``--bias_correction``); None: used as they are.
    Raises DataError (inputs), ModelDirError (the folder), TrainingError (the run cannot start or
    save), DivergenceError (a non-finite loss or weights).
    """
    strategy = strategy or tf.distribute.get_strategy()
    chief = distribute.is_chief(strategy)
    if config.batch_size % strategy.num_replicas_in_sync:
        raise TrainingError(f"batch_size {config.batch_size} is the global batch: make it a "
                            f"multiple of the {strategy.num_replicas_in_sync} replicas in sync")
    model_dir = ModelDir(model_dir)
    atlas, atlas_labels, scan_paths = check_inputs(atlas_path, atlas_labels_path, scan_paths,
                                                   align, preparation)
    pairs = load_validation_pairs(val_images, val_labels) if val_images else []
    pairs = align_validation_pairs(atlas, pairs, align)
    config = resolve_config(config, atlas, atlas_labels)
    saved_config = model_dir.check().load_config() if resume else None  # not yet rewritten
    config = _prepare_run_folder(model_dir, config, (atlas, atlas_labels), resume, chief,
                                 label_names, extra_atlases)
    model, checkpoint, manager, best_manager = _build(config, (atlas, atlas_labels), model_dir,
                                                      strategy, chief)
    status = _restore_for_resume(model, checkpoint, model_dir, config, chief) if resume else None
    steps_done = int(model.g_optimizer.iterations.numpy())
    if steps_done >= config.steps:
        logging.info("run already has %d >= %d steps; nothing to train", steps_done, config.steps)
        if status is not None:  # optimiser slots are never built: no warning for each of them
            status.expect_partial()
    else:
        try:
            _fit(model, config, scan_paths, pairs, atlas, atlas_labels, model_dir, manager,
                 best_manager, steps_done, (strategy, chief), verbose, stop_request)
        except DivergenceError:
            if resume and chief and not manager.saved_steps:
                saved_config.save(model_dir.config_path)  # its checkpoints' settings, not these
            raise
    if chief and export:
        if steps_done >= config.steps and model_dir.is_exported():
            logging.info("%s is already exported from its checkpoint; not exporting again",
                         model_dir.latest_saved_model())
        else:
            finish_run(model_dir, config, pairs[0][0] if pairs else data.load_scan(scan_paths[0]))
    return model_dir


def _build(config: LTNetConfig, atlas_volumes, model_dir: ModelDir, strategy, chief: bool):
    """(model, checkpoint, checkpoint manager, best-checkpoint manager), seeded, under the
    strategy; a non-chief worker's managers save into scratch folders."""
    tf.keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    with strategy.scope():
        model = build_model(config, *atlas_volumes)
        checkpoint = make_checkpoint(model)
    manager = CheckpointSaver(checkpoint, distribute.writable_dir(model_dir.checkpoint_dir, chief),
                              max_to_keep=3)
    best_manager = CheckpointSaver(
        checkpoint, distribute.writable_dir(model_dir.best_checkpoint_dir, chief), max_to_keep=1)
    return model, checkpoint, manager, best_manager


def _prepare_run_folder(model_dir: ModelDir, config: LTNetConfig, atlas_volumes, resume: bool,
                        chief: bool, label_names=None, extra_atlases=()) -> LTNetConfig:
    """The config the run trains with; a new run's folder created (by the chief), the label names
    and further atlases checked and kept. Every check comes before anything is written."""
    atlas, atlas_labels = atlas_volumes
    if extra_atlases:
        AtlasSet.load([atlas.path, *[i for i, _ in extra_atlases]],
                      [atlas_labels.path, *[label for _, label in extra_atlases]])
    names = LabelNames.from_file(label_names) if label_names else None
    if names is not None:
        names.check_covers(config.label_ids, f"the atlas labels {atlas_labels.path}")
    if resume:
        config = model_dir.resumed_config(config)
    elif chief:
        config = model_dir.create(config, atlas, atlas_labels)
    if chief and names is not None:
        names.save(model_dir.label_names_path)
    if chief and extra_atlases:
        model_dir.keep_atlases(extra_atlases)
    return config


def _restore_for_resume(model, checkpoint, model_dir: ModelDir, config: LTNetConfig, chief: bool):
    """Restore the newest intact checkpoint; the config's (possibly changed) learning rates win
    over the ones the optimisers saved. config.json is rewritten only now."""
    latest = model_dir.newest_intact_checkpoint()
    status = checkpoint.restore(latest)
    status.assert_existing_objects_matched()
    model.g_optimizer.learning_rate = config.g_learning_rate
    if model.d_optimizer is not None:
        model.d_optimizer.learning_rate = config.d_learning_rate
    logging.info("resuming %s at step %d from %s", model_dir.path,
                 int(model.g_optimizer.iterations.numpy()), latest)
    if chief:
        config.save(model_dir.config_path)
    return status


def _fit(model, config, scan_paths, pairs, atlas, atlas_labels, model_dir, manager, best_manager,
         steps_done, workers, verbose, stop_request=None):
    strategy, chief = workers
    dataset = make_training_dataset(scan_paths, config, skip_batches=steps_done)
    validator = None
    if pairs:
        label_transfer = LabelTransfer(model.forward_generator, config, atlas.data, atlas_labels.data)
        validator = Validator(label_transfer, pairs, config)
    guard = DivergenceGuard(model.g_optimizer.iterations)
    callbacks = [guard, StopAtStep(model.g_optimizer, config.steps),
                 Checkpointing(manager, best_manager, model.g_optimizer.iterations, model_dir,
                               validator, chief, guard)]
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
    from ltnet_tf.serving.modeldir import ModelDirError

    signum = signals.signal_number(interrupt)
    how = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}.get(signum, "stopped")
    how = f"{how} ({signal.Signals(signum).name})"
    resume = f"python train.py --resume --model_dir {model_dir.path} (and the same data flags)"
    step = getattr(interrupt, "step", None)
    if step is not None:
        return f"{how} at step {step}: saved ckpt-{step}; continue from it with {resume}"
    try:
        last = os.path.basename(model_dir.newest_intact_checkpoint())
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


def finish_run(model_dir: ModelDir, config: LTNetConfig, scan: data.Volume) -> None:
    """Export (SavedModel + VoxelMorph .h5) and draw the QC picture of ``scan`` (a validation
    scan, else a training scan) from the exported model."""
    from ltnet_tf.reporting import qc
    from ltnet_tf.serving import export  # heavy imports only at the end of a run
    # Exports are float32 whatever the training precision (serving inputs and tests are float32).
    tf.keras.mixed_precision.set_global_policy("float32")
    export.export_all(model_dir)
    generator = model_dir.restore_forward_generator(config)
    atlas, atlas_labels = model_dir.load_atlas()
    label_transfer = LabelTransfer(generator, config, atlas.data, atlas_labels.data)
    segmentation = label_transfer(scan.data[None, ..., None])["segmentation"][0].numpy()
    qc.save_scan_qc_png(scan, segmentation, model_dir.qc_path,
                        title=f"{os.path.basename(scan.path)}: transferred atlas labels")
