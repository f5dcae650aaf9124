"""Where G_F comes from at prediction time: a run folder's SavedModel (the default: exactly what TF
Serving runs) or one of its checkpoints, rebuilt from ``config.json``.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import numpy as np
import tensorflow as tf
from absl import logging

from ltnet_tf.io import volumes as data
from ltnet_tf.registration.transfer import LabelTransfer
from ltnet_tf.serving.modeldir import ModelDir, ModelDirError
from ltnet_tf.serving.signatures import DISPLACEMENT_SIGNATURE, SEGMENT_SIGNATURE, SERVING_SIGNATURE

SOURCES = ("auto", "saved_model", "checkpoint")


def load_serving_signatures(saved_model: str, fall_back: bool):
    """The signatures of the SavedModel folder ``saved_model``. A damaged one (``variables/`` gone,
    ``saved_model.pb`` truncated, an empty version folder) is a one-line ModelDirError naming it,
    or with ``fall_back`` a warning and None, so that the caller rebuilds G_F from a checkpoint."""
    try:
        signatures = tf.saved_model.load(saved_model).signatures
        missing = [name for name in (SERVING_SIGNATURE, SEGMENT_SIGNATURE,
                                     DISPLACEMENT_SIGNATURE) if name not in signatures]
        if missing:
            raise ValueError(f"no {', '.join(missing)} signature")
    except Exception as e:  # noqa: BLE001  (protobuf, OSError, OpError... all mean "damaged")
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if not fall_back:
            raise ModelDirError(f"{saved_model}: damaged SavedModel, cannot be loaded ({reason}); "
                                f"re-export it with ltnet-export --model_dir") from None
        logging.warning("%s: damaged SavedModel, using the checkpoint instead (%s)", saved_model,
                        reason)
        return None
    return signatures


class RunFolderNetwork:
    """G_F of a trained run folder, with its atlas, from its SavedModel or a checkpoint.

    ``source``: 'auto' (the SavedModel if there is an intact one, else a checkpoint),
    'saved_model' or 'checkpoint'; ``checkpoint``: 'auto' (best if the run validated, else last),
    'best' or 'last'. Raises ModelDirError naming the folder or file when the run cannot be used.
    """

    def __init__(self, model_dir, source: str = "auto", checkpoint: str = "auto"):
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
        self.model_dir = ModelDir(model_dir).check()
        self.config = self.model_dir.load_config()
        self.atlas, self.atlas_labels = self.model_dir.load_atlas()
        saved_model = self.model_dir.latest_saved_model()
        if source == "saved_model" and saved_model is None:
            raise ModelDirError(f"{self.model_dir.path}: no SavedModel in saved_model/ "
                                f"(run ltnet-export --model_dir {self.model_dir.path})")
        signatures = None
        if source != "checkpoint" and saved_model is not None:
            signatures = load_serving_signatures(saved_model, fall_back=source == "auto")
        if signatures is not None:
            full, only_labels = (signatures[SERVING_SIGNATURE],
                                 signatures[SEGMENT_SIGNATURE])
            working = signatures[DISPLACEMENT_SIGNATURE]
            self._segment = lambda scan, extras: (full if extras else only_labels)(
                scan=tf.constant(scan))
            self._working_displacement = lambda scan: working(
                scan=tf.constant(scan))["flow_working"]
            self.source = saved_model
        else:
            generator = self.model_dir.restore_forward_generator(self.config, checkpoint)
            label_transfer = LabelTransfer(generator, self.config, self.atlas.data,
                                           self.atlas_labels.data)
            transfer = tf.function(label_transfer.transfer)
            segment = tf.function(label_transfer.segment)
            self._segment = lambda scan, extras: (transfer if extras else segment)(scan)
            displacement = tf.function(label_transfer.displacement)
            self._working_displacement = lambda scan: displacement(scan)["flow_working"]
            self.source = self.model_dir.checkpoint(checkpoint)

    def segment(self, scan: data.Volume, extras: bool = True) -> dict:
        """One scan on the atlas grid -> {'segmentation' [D,H,W] label IDs, and with ``extras``
        'flow' [D,H,W,3] and 'warped_atlas' [D,H,W,1]}, network and label warp in one call."""
        data.check_same_grid(self.atlas, scan, strict=False)
        outputs = self._segment(scan.data[None, ..., None].astype(np.float32), extras)
        return {name: value[0].numpy() for name, value in outputs.items()}

    def working_displacement(self, scan: data.Volume) -> np.ndarray:
        """G_F's displacement on its working grid [*working_shape, 3] (working voxels, pull) for a
        scan on the atlas grid; ``inference.resample_displacement`` or a refinement takes it from
        there."""
        data.check_same_grid(self.atlas, scan, strict=False)
        return np.asarray(self._working_displacement(
            scan.data[None, ..., None].astype(np.float32))[0])
