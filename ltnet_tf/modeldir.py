"""The run folder: everything a trained model needs, self-contained (nnU-Net style).

    RUN/config.json             the resolved LTNetConfig (atlas grid and label IDs included)
    RUN/atlas.nii.gz            copy of the atlas image, and
    RUN/atlas_labels.nii.gz     of its label map (so the folder is all a predictor needs)
    RUN/checkpoints/ckpt-N      training checkpoints (networks + optimisers), newest kept
    RUN/best/ckpt-N             the checkpoint with the best validation Dice (when validating)
    RUN/validation.json         validation mean Dice at every checkpoint step
    RUN/generator.h5            G_F for VoxelMorph: vxm.networks.VxmDense.load(path)
    RUN/saved_model/<version>/  the TF Serving SavedModel
    RUN/logs/                   TensorBoard
    RUN/qc.png                  three slices of a scan with its transferred labels outlined
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os

import tensorflow as tf

from ltnet_tf import data
from ltnet_tf.config import ConfigError, LTNetConfig
from ltnet_tf.networks import ForwardGenerator


class ModelDirError(ValueError):
    """The folder is not a usable LT-Net model folder; the message names the folder and the problem."""


def checkpoint_problem(path: str):
    """Why the checkpoint ``path`` cannot be read (one line), or None when every tensor reads.

    Reading it all costs one pass over the files; it turns a truncated ``.data`` (an IndexError
    deep in TensorFlow) or ``.index`` (an "sstable" error) into a message that names the file.
    """
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as e:  # noqa: BLE001  (TensorFlow raises IndexError, OpError, ValueError...)
        return (str(e).strip().splitlines() or [type(e).__name__])[0]
    return None


def checkpoints_newest_first(directory: str) -> list:
    """The checkpoints a CheckpointManager recorded in ``directory``, newest first."""
    state = tf.train.get_checkpoint_state(directory)
    if state is None:
        return []
    paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
    paths = [p if os.path.isabs(p) else os.path.join(directory, p) for p in paths]
    return sorted(set(paths), key=lambda p: int(p.rsplit("-", 1)[-1]) if p.rsplit("-", 1)[-1]
                  .isdigit() else -1, reverse=True)


class ModelDir:
    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))

    def __repr__(self):
        return f"ModelDir({self.path!r})"

    def _join(self, *parts) -> str:
        return os.path.join(self.path, *parts)

    config_path = property(lambda self: self._join("config.json"))
    atlas_path = property(lambda self: self._join("atlas.nii.gz"))
    atlas_labels_path = property(lambda self: self._join("atlas_labels.nii.gz"))
    checkpoint_dir = property(lambda self: self._join("checkpoints"))
    best_checkpoint_dir = property(lambda self: self._join("best"))
    generator_h5_path = property(lambda self: self._join("generator.h5"))
    saved_model_base = property(lambda self: self._join("saved_model"))
    log_dir = property(lambda self: self._join("logs"))
    qc_path = property(lambda self: self._join("qc.png"))
    validation_history_path = property(lambda self: self._join("validation.json"))

    # ---------------------------------------------------------------- reading a trained folder
    def check(self) -> "ModelDir":
        if not os.path.isdir(self.path):
            raise ModelDirError(f"{self.path}: model folder not found")
        if not os.path.isfile(self.config_path):
            raise ModelDirError(f"{self.path}: not an LT-Net model folder (no config.json)")
        for path in (self.atlas_path, self.atlas_labels_path):
            if not os.path.isfile(path):
                raise ModelDirError(f"{self.path}: incomplete model folder ({os.path.basename(path)} "
                                    f"missing)")
        return self

    def load_config(self) -> LTNetConfig:
        try:
            config = LTNetConfig.load(self.config_path)
        except ConfigError as e:
            raise ModelDirError(str(e)) from None
        if config.atlas_shape is None or config.label_ids is None:
            raise ModelDirError(f"{self.config_path}: config has no atlas_shape/label_ids; "
                                f"was this folder written by train.py?")
        return config

    def load_atlas(self):
        """(atlas Volume, atlas label Volume)."""
        return data.load_scan(self.atlas_path), data.load_label_map(self.atlas_labels_path)

    def checkpoint(self, which: str = "auto") -> str:
        """Path of the 'best', 'last' or ('auto') best-if-any-else-last checkpoint."""
        if which not in ("auto", "best", "last"):
            raise ValueError(f"checkpoint must be auto, best or last, got {which!r}")
        best = tf.train.latest_checkpoint(self.best_checkpoint_dir)
        last = tf.train.latest_checkpoint(self.checkpoint_dir)
        chosen = {"best": best, "last": last, "auto": best or last}[which]
        if chosen is None and which == "best" and last is not None:
            raise ModelDirError(f"{self.path}: no best checkpoint (the run was trained without "
                                f"--val_images, so none is chosen by validation Dice); use "
                                f"--checkpoint last")
        if chosen is None:
            raise ModelDirError(f"{self.path}: no {'' if which == 'auto' else which + ' '}"
                                f"checkpoint found (train first)")
        return chosen

    def restore_forward_generator(self, config: LTNetConfig = None, which: str = "auto"):
        """G_F rebuilt from the config with the chosen checkpoint's weights; loud on mismatch."""
        config = config or self.load_config()
        generator = ForwardGenerator.from_ltnet_config(config)
        path = self.checkpoint(which)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ModelDirError(f"{path}: damaged checkpoint, cannot be read ({problem})")
        status = None
        try:
            status = tf.train.Checkpoint(forward_generator=generator).restore(path)
            status.expect_partial().assert_existing_objects_matched()
        except (AssertionError, ValueError, tf.errors.OpError) as e:
            if status is not None:
                status.expect_partial()
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            raise ModelDirError(f"{path}: checkpoint does not match {self.config_path} "
                                f"({reason})") from None
        return generator

    # ---------------------------------------------------------------- versions for TF Serving
    def saved_model_versions(self) -> list:
        if not os.path.isdir(self.saved_model_base):
            return []
        return sorted(int(v) for v in os.listdir(self.saved_model_base) if v.isdigit())

    def latest_saved_model(self):
        versions = self.saved_model_versions()
        return os.path.join(self.saved_model_base, str(versions[-1])) if versions else None
