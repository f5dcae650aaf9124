"""The run folder: everything a trained model needs, self-contained (nnU-Net style). ``ModelDir`` is
its one owner: it creates it, names every file in it, and reads it back.

    RUN/config.json             the resolved LTNetConfig (atlas grid and label IDs included)
    RUN/atlas.nii.gz            copy of the atlas image, and
    RUN/atlas_labels.nii.gz     of its label map (so the folder is all a predictor needs)
    RUN/checkpoints/ckpt-N      training checkpoints (networks + optimisers), newest kept
    RUN/best/ckpt-N             the checkpoint with the best validation Dice (when validating)
    RUN/best/best.json          its step and validation Dice
    RUN/validation.json         validation mean Dice at every checkpoint step
    RUN/generator.h5            G_F for VoxelMorph: vxm.networks.VxmDense.load(path)
    RUN/saved_model/<version>/  the TF Serving SavedModel (its metadata in assets.extra/)
    RUN/logs/                   TensorBoard
    RUN/qc.png                  three slices of a scan with its transferred labels outlined
    RUN/label_names.json        the structures' names and colours (train.py --label_names)
    RUN/atlases/NAME.nii.gz     further atlases (train.py --atlas A,B,...) with their label maps
    RUN/atlases/NAME_labels.nii.gz   (predict.py registers them too and fuses the labels)
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import json
import os
import time

import tensorflow as tf
from absl import logging

from ltnet_tf.config import RESUME_CHANGEABLE, ConfigError, LTNetConfig, resume_config
from ltnet_tf.files import atomic_write
from ltnet_tf.io import volumes as data

# TF Serving ignores assets.extra/, so metadata there travels with the version without being served.
SAVED_MODEL_METADATA = os.path.join("assets.extra", "ltnet_serving.json")


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
    best_record_path = property(lambda self: self._join("best", "best.json"))
    generator_h5_path = property(lambda self: self._join("generator.h5"))
    saved_model_base = property(lambda self: self._join("saved_model"))
    log_dir = property(lambda self: self._join("logs"))
    qc_path = property(lambda self: self._join("qc.png"))
    label_names_path = property(lambda self: self._join("label_names.json"))
    validation_history_path = property(lambda self: self._join("validation.json"))

    # ---------------------------------------------------------------- creating and resuming
    def holds_run(self) -> bool:
        """A config with a checkpoint or an export. A config alone is a start that failed (e.g. a
        scan that went bad before the first checkpoint): it may be started again."""
        return os.path.exists(self.config_path) and bool(
            tf.train.latest_checkpoint(self.checkpoint_dir) or self.saved_model_versions())

    def create(self, config: LTNetConfig, atlas, atlas_labels) -> LTNetConfig:
        """A new run: the folder, the atlas copies and ``config.json``. Raises ModelDirError when
        the folder already holds a run or cannot be written."""
        if self.holds_run():
            raise ModelDirError(f"{self.path}: folder already holds a run; pass --resume to "
                                f"continue it or choose another --model_dir")
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as e:
            raise ModelDirError(f"{self.path}: cannot create model folder ({e.strerror})") from None
        if not os.access(self.path, os.W_OK):
            raise ModelDirError(f"{self.path}: model folder is not writable")
        data.save_nifti(atlas.data, atlas.affine, self.atlas_path, header=atlas.header)
        data.save_nifti(atlas_labels.data, atlas_labels.affine, self.atlas_labels_path,
                        header=atlas_labels.header)
        config.save(self.config_path)
        return config

    def resumed_config(self, config: LTNetConfig) -> LTNetConfig:
        """The run's saved config with the fields that may change mid-run (``RESUME_CHANGEABLE``)
        taken from ``config``; the atlas must be the run's. Nothing is written: ``config.json`` is
        rewritten only once the checkpoint is restored, so a resume that fails leaves it as it was."""
        saved = self.check().load_config()
        if saved.atlas_shape != config.atlas_shape or saved.label_ids != config.label_ids:
            raise ModelDirError(f"{self.path}: --resume with a different atlas than the run's")
        return saved.replace(**{name: getattr(config, name) for name in RESUME_CHANGEABLE})

    def resume_config(self, asked: LTNetConfig, given) -> LTNetConfig:
        """What ``train.py --resume`` continues with: the saved config, with the explicitly
        ``given`` fields of ``asked`` applied where a run may change them (and said); any other
        change raises ConfigError (see ``config.resume_config``)."""
        config, changes = resume_config(LTNetConfig.load(self.config_path), asked, given,
                                        self.config_path)
        if changes:
            print("resuming with " + ", ".join(f"{k}={old} -> {new}"
                                               for k, (old, new) in changes.items()), flush=True)
        return config

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
            self.inside(path, os.path.basename(path))  # a link to a file elsewhere
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

    def load_label_names(self):
        """The structures' names: ``label_names.json`` if the run has one, else FreeSurfer's."""
        from ltnet_tf.io.label_names import LabelNames

        if os.path.isfile(self.label_names_path):
            return LabelNames.load(self.label_names_path)
        return LabelNames.freesurfer()

    def keep_atlases(self, atlases) -> None:
        """Copy further atlases [(image path, label path)] into ``atlases/`` (their own grids)."""
        folder = self._join("atlases")
        os.makedirs(folder, exist_ok=True)
        for image_path, label_path in atlases:
            image, labels = data.load_scan(image_path), data.load_label_map(label_path)
            name = data.scan_name(image_path)
            data.save_nifti(image.data, image.affine, os.path.join(folder, f"{name}.nii.gz"),
                            header=image.header, dtype="float32")
            data.save_nifti(labels.data, labels.affine,
                            os.path.join(folder, f"{name}_labels.nii.gz"), header=labels.header)

    def extra_atlases(self) -> list:
        """[(image path, label path)] of the further atlases kept in ``atlases/``, by name."""
        folder = self._join("atlases")
        if not os.path.isdir(folder):
            return []
        images = sorted(n for n in os.listdir(folder) if n.endswith(".nii.gz")
                        and not n.endswith("_labels.nii.gz") and not n.startswith("."))
        return [(self.inside(os.path.join(folder, n), f"atlases/{n}"),
                 self.inside(os.path.join(folder, n[:-7] + "_labels.nii.gz"), f"atlases/{n}"))
                for n in images]

    def load_atlas(self):
        """(atlas Volume, atlas label Volume)."""
        return data.load_scan(self.atlas_path), data.load_label_map(self.atlas_labels_path)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, which: str = "auto") -> str:
        """Path of the 'best', 'last' or ('auto') best-if-any-else-last checkpoint."""
        if which not in ("auto", "best", "last"):
            raise ModelDirError(f"checkpoint must be auto, best or last, got {which!r}")
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
        return self.inside(chosen, "its checkpoint record")

    def inside(self, path: str, named_by: str) -> str:
        """``path`` if it lies inside the run folder (symbolic links resolved); a run folder
        from elsewhere must not make predict.py read files outside it. Raises ModelDirError."""
        real, root = os.path.realpath(path), os.path.realpath(self.path)
        if os.path.commonpath([real, root]) != root:
            raise ModelDirError(f"{self.path}: {named_by} names {path}, outside the run folder; "
                                f"refused (copy the files into the run folder)")
        return path

    def newest_intact_checkpoint(self) -> str:
        """The newest checkpoint that reads back whole; a damaged newer one is skipped with a
        warning (it is overwritten when training reaches its step again)."""
        candidates = checkpoints_newest_first(self.checkpoint_dir)
        if not candidates:
            raise ModelDirError(f"{self.path}: nothing to resume (no checkpoint)")
        for path in candidates:
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            logging.warning("%s: damaged checkpoint, skipped (%s)", path, problem)
        raise ModelDirError(f"{self.checkpoint_dir}: nothing to resume, every checkpoint is "
                            f"damaged ({', '.join(os.path.basename(p) for p in candidates)})")

    def restore_forward_generator(self, config: LTNetConfig = None, which: str = "auto"):
        """G_F rebuilt from the config with the chosen checkpoint's weights; loud on mismatch."""
        # VoxelMorph (with neurite, scikit-learn, pandas) only where G_F is built: a prediction
        # without a network, or from the SavedModel, never imports it (~0.7 s of start-up).
        from ltnet_tf.registration.networks import ForwardGenerator

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

    # ---------------------------------------------------------------- validation records
    def _best_record(self, directory=None) -> str:
        return (self.best_record_path if directory is None
                else os.path.join(directory, os.path.basename(self.best_record_path)))

    def best_validation_dice(self, directory: str = None) -> float:
        """The best validation Dice recorded so far (-1 before any). ``directory``: where the
        best checkpoint is kept, if not ``best/`` (a non-chief worker's scratch copy)."""
        path = self._best_record(directory)
        if not os.path.isfile(path):
            return -1.0
        with open(path) as f:
            return json.load(f)["val_dice"]

    def record_best(self, step: int, dice: float, directory: str = None) -> None:
        """``best/best.json``: the step and validation Dice of the best checkpoint."""
        with atomic_write(self._best_record(directory)) as f:
            json.dump({"step": step, "val_dice": dice}, f)

    def append_validation(self, step: int, dice: float) -> None:
        """``validation.json``: every validation, the Dice-vs-steps curve (a resumed tail is
        replaced)."""
        history = []
        if os.path.isfile(self.validation_history_path):
            with open(self.validation_history_path) as f:
                history = [r for r in json.load(f) if r["step"] < step]
        history.append({"step": step, "val_dice": dice, "time": time.time()})
        with atomic_write(self.validation_history_path) as f:
            json.dump(history, f, indent=1)

    # ---------------------------------------------------------------- exports
    def saved_model_versions(self) -> list:
        if not os.path.isdir(self.saved_model_base):
            return []
        return sorted(int(v) for v in os.listdir(self.saved_model_base) if v.isdigit())

    def latest_saved_model(self):
        versions = self.saved_model_versions()
        if not versions:
            return None
        return self.inside(os.path.join(self.saved_model_base, str(versions[-1])),
                           f"saved_model/{versions[-1]}")

    def saved_model_metadata(self, saved_model: str = None) -> dict:
        """The export metadata of ``saved_model`` (default: the newest version)."""
        saved_model = saved_model or self.latest_saved_model()
        with open(os.path.join(saved_model, SAVED_MODEL_METADATA)) as f:
            return json.load(f)

    def is_exported(self) -> bool:
        """The newest SavedModel and generator.h5 exist and come from the checkpoint an export would
        use now, so exporting again would only add an identical version."""
        if self.latest_saved_model() is None or not os.path.isfile(self.generator_h5_path):
            return False
        try:
            exported_from = self.saved_model_metadata()["checkpoint"]
            return exported_from == os.path.relpath(self.checkpoint("auto"), self.path)
        except (OSError, ValueError, KeyError, TypeError):
            return False


def checked_model_dir(model_dir) -> ModelDir:
    """``model_dir`` (a path or a ``ModelDir``) as a checked ``ModelDir``; raises ``ModelDirError``."""
    return (model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)).check()


def restore_for_export(model_dir: ModelDir, which: str):
    """(config, G_F, checkpoint path) of ``which`` checkpoint (auto, best or last), loud when the
    checkpoint does not fit the config; raises ``ModelDirError``."""
    if which not in ("auto", "best", "last"):
        raise ModelDirError(f"checkpoint must be auto, best or last, got {which!r}")
    config = model_dir.load_config()
    checkpoint = model_dir.checkpoint(which)
    generator = model_dir.restore_forward_generator(config, which)
    return config, generator, checkpoint
