"""Export a trained run folder for TF Serving (SavedModel) and for VoxelMorph scripts (``.h5``).

    RUN/saved_model/<version>/      TF Serving's layout: --model_base_path=RUN/saved_model
    RUN/saved_model/<version>/assets.extra/ltnet_serving.json   what a client sends, gets back
    RUN/generator.h5                G_F: vxm.networks.VxmDense.load(path)

The SavedModel is ``LabelTransfer`` (``ltnet_tf.registration.transfer``) with the atlas baked in as constants,
so the serving side needs TensorFlow only: no ltnet_tf, VoxelMorph or neurite. Signatures:

    serving_default(scan [B, D, H, W, 1] float32)
        -> segmentation [B, D, H, W] int32 label IDs, flow [B, D, H, W, 3],
           warped_atlas [B, D, H, W, 1]
    register(atlas [D, H, W] float32, atlas_labels [D, H, W] int32, scan [B, D, H, W, 1] float32)
        -> the same outputs, for another atlas on the same grid
    segment(scan) -> segmentation only
    segment_refined(scan, steps [] int32, coarse_steps [] int32) -> segmentation, after test-time
        refinement (``ltnet_tf.registration.refinement``): ``coarse_steps`` Adam steps on the working grid, then
        ``steps`` at the grid factor fixed at export (metadata "refinement"); 0 and 0 give
        ``segment``'s result

    displacement(scan) -> flow_working [B, *working_shape, 3]: G_F's displacement on its
        working grid (working voxels), for clients that refine or pull labels themselves

Scans are raw intensities on the atlas grid (D, H, W) = config.atlas_shape; intensity normalisation
(percentiles of the brain, ``ltnet_tf.io.intensity``), padding and downsampling happen inside the
signature. The signatures declare their inputs without a shape and check it first
(``ltnet_tf.serving.serving_inputs``): a wrong one fails with a message naming the expected shape and the
fix, in TF Serving and ``saved_model_cli`` too. Library functions raise ``ModelDirError`` or
``DataError`` with a one-line message; the command line (``ltnet_tf.commands.cli.export_main``) prints it
and exits with status 1:

    ltnet-export --model_dir models/RUN [--checkpoint best] [--version 3]
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401  (before TensorFlow)

import json
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl import logging

import ltnet_tf
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.registration.refinement import Refinement
from ltnet_tf.registration.transfer import LabelTransfer
from ltnet_tf.serving.export_h5 import write_generator_h5
from ltnet_tf.serving.modeldir import checked_model_dir, restore_for_export
from ltnet_tf.serving.modeldir import SAVED_MODEL_METADATA, ModelDir, ModelDirError
from ltnet_tf.serving.serving_inputs import for_atlas_grid
from ltnet_tf.serving.signatures import (  # noqa: F401  (clients' names, also read from here)
    COARSE_STEPS_INPUT, DISPLACEMENT_SIGNATURE, REGISTER_SIGNATURE, SEGMENT_REFINED_SIGNATURE,
    SEGMENT_SIGNATURE, SERVING_SIGNATURE, STEPS_INPUT)

# segment_refined refines on RefinementSettings' fine grid (``refine_factor`` of the export; 0 or
# None exports no segment_refined) and recommends its step counts in the metadata.
# XLA makes a refinement step 3x cheaper on CPU (bench/results/refinement.md), but TF Serving runs
# XLA-compiled functions only when started with --xla_cpu_compilation_enabled=true (experimental),
# so the default export runs everywhere and XLA is asked for (ltnet-export --refine_xla).
REFINE_XLA = False
SCAN_INPUT = "scan"
OUTPUTS = ("segmentation", "flow", "warped_atlas")
METADATA_PATH = SAVED_MODEL_METADATA
METADATA_FORMAT = "ltnet_serving/1"


def serving_inputs(grid) -> dict:
    """Input name -> ``serving_inputs.ServingInput`` of the signatures for atlas grid ``grid``."""
    return for_atlas_grid(grid, SCAN_INPUT, (STEPS_INPUT, COARSE_STEPS_INPUT))


class _Untracked:
    """Holds an object out of TensorFlow's dependency tracking."""

    def __init__(self, value):
        self.value = value


class ServingModule(tf.Module):
    """``LabelTransfer`` behind ``tf.function`` signatures whose inputs are checked inside
    (``ltnet_tf.serving.serving_inputs``): a scan of the wrong shape fails with a message that names the
    expected shape and the fix, in TF Serving and ``saved_model_cli`` too.

    Only G_F's variables are tracked, not the Keras model itself: ``tf.saved_model.save`` would
    otherwise also serialise Keras metadata and trace every layer, which is slower and of no use to
    a server that loads the signatures with plain TensorFlow.
    """

    def __init__(self, label_transfer: LabelTransfer, refinement: Refinement = None,
                 name: str = "ltnet_serving"):
        super().__init__(name=name)
        self._label_transfer = _Untracked(label_transfer)
        self._refinement = _Untracked(refinement)
        self.generator_variables = list(label_transfer.forward_generator.variables)
        self._inputs = _Untracked(serving_inputs(label_transfer.full_shape))
        specs = lambda *names: [self.inputs[name].signature_spec for name in names]  # noqa: E731
        self.serve = tf.function(self._serve, input_signature=specs(SCAN_INPUT))
        self.segment = tf.function(self._segment, input_signature=specs(SCAN_INPUT))
        self.displacement = tf.function(self._displacement, input_signature=specs(SCAN_INPUT))
        self.register = tf.function(self._register, input_signature=specs(
            "atlas", "atlas_labels", SCAN_INPUT))
        if refinement is not None:
            self.segment_refined = tf.function(self._segment_refined, input_signature=specs(
                SCAN_INPUT, STEPS_INPUT, COARSE_STEPS_INPUT))

    @property
    def label_transfer(self) -> LabelTransfer:
        return self._label_transfer.value

    @property
    def refinement(self):
        return self._refinement.value

    @property
    def inputs(self) -> dict:
        """Input name -> ``serving_inputs.ServingInput``: what a client must send."""
        return self._inputs.value

    def _checked(self, **tensors):
        """The inputs, in the order given, after their shape checks."""
        checked = [self.inputs[name].checked(tensor) for name, tensor in tensors.items()]
        return checked[0] if len(checked) == 1 else checked

    def _serve(self, scan):
        return self.label_transfer.transfer(self._checked(scan=scan))

    def _segment(self, scan):
        return self.label_transfer.segment(self._checked(scan=scan))

    def _displacement(self, scan):
        return self.label_transfer.displacement(self._checked(scan=scan))

    def _register(self, atlas, atlas_labels, scan):
        return self.label_transfer.transfer_with_atlas(
            *self._checked(atlas=atlas, atlas_labels=atlas_labels, scan=scan))

    def _segment_refined(self, scan, steps, coarse_steps):
        scan, steps, coarse_steps = self._checked(scan=scan, steps=steps,
                                                  coarse_steps=coarse_steps)
        refine = lambda scan_normalized, flow_working, full_grid: self.refinement(  # noqa: E731
            scan_normalized, flow_working, steps=steps, coarse_steps=coarse_steps,
            full_grid=full_grid)
        return self.label_transfer.segment(scan, refinement=refine)

    def signatures(self) -> dict:
        signatures = {SERVING_SIGNATURE: self.serve.get_concrete_function(),
                      SEGMENT_SIGNATURE: self.segment.get_concrete_function(),
                      DISPLACEMENT_SIGNATURE: self.displacement.get_concrete_function(),
                      REGISTER_SIGNATURE: self.register.get_concrete_function()}
        if self.refinement is not None:
            signatures[SEGMENT_REFINED_SIGNATURE] = self.segment_refined.get_concrete_function()
        return signatures


# ------------------------------------------------------------------------------- reading the run
def _load_atlas(model_dir: ModelDir, config):
    atlas, atlas_labels = model_dir.load_atlas()
    for volume in (atlas, atlas_labels):
        if tuple(volume.shape) != tuple(config.atlas_shape):
            raise ModelDirError(f"{volume.path}: shape {tuple(volume.shape)} differs from "
                                f"atlas_shape {list(config.atlas_shape)} in "
                                f"{model_dir.config_path}")
    unknown = sorted(set(np.unique(atlas_labels.data).tolist()) - set(config.label_ids))
    if unknown:
        raise ModelDirError(f"{atlas_labels.path}: label IDs {unknown[:10]} are not in "
                            f"label_ids of {model_dir.config_path}")
    return atlas, atlas_labels


# ------------------------------------------------------------------------------- SavedModel
def _spec_json(spec) -> dict:
    return {"dtype": spec.dtype.name, "shape": spec.shape.as_list()}


def _signature_json(concrete_function, expected_inputs: dict) -> dict:
    """Inputs as a client must send them (``expected_inputs``: name -> ServingInput; the signature
    itself accepts any shape and checks it inside), outputs as the signature declares them."""
    inputs, _ = concrete_function.structured_input_signature
    return {
        "inputs": {spec.name: _spec_json(expected_inputs[spec.name].expected_spec)
                   for spec in inputs},
        "outputs": {name: _spec_json(tensor)
                    for name, tensor in sorted(concrete_function.structured_outputs.items())},
    }


def serving_metadata(config, signatures: dict, checkpoint: str, version: int,
                     refinement: Refinement = None, names: LabelNames = None) -> dict:
    """The JSON a client reads to know what to send: grid, signatures, label IDs and names.

    ``signatures``: name -> concrete function; ``checkpoint``: where the weights came from;
    ``names``: the structures' names (default FreeSurfer's).
    """
    names = names or LabelNames.freesurfer()
    expected_inputs = serving_inputs(config.atlas_shape)
    metadata = {
        "format": METADATA_FORMAT,
        "version": version,
        "atlas_shape": [int(s) for s in config.atlas_shape],
        "working_shape": [int(s) for s in config.working_shape()],
        "downsample": int(config.downsample),
        "intensities": "raw; per-scan normalisation (percentiles of the brain, clipped to [0, 1]) "
                       "is inside the signatures",
        "signatures": {name: _signature_json(fn, expected_inputs)
                       for name, fn in signatures.items()},
        "label_ids": [int(i) for i in config.label_ids],
        "structure_names": {str(int(i)): names.name(i) for i in config.label_ids},
        "label_names": names.to_dict(),
        "checkpoint": checkpoint,
        "ltnet_tf_version": ltnet_tf.__version__,
        "tensorflow_version": tf.__version__,
        "ltnet_config": config.to_dict(),
    }
    if refinement is not None:
        metadata["refinement"] = {
            "signature": SEGMENT_REFINED_SIGNATURE,
            "factor": refinement.factor, "grid": list(refinement.grid_shape),
            "learning_rate": refinement.learning_rate,
            "weight_smooth": refinement.weight_smooth, "coarse_factor": refinement.coarse_factor,
            "recommended_steps": RefinementSettings().steps,
            "recommended_coarse_steps": RefinementSettings().coarse_steps if refinement.coarse else 0,
            "xla": refinement.jit_compile}
    return metadata


def _next_version(model_dir: ModelDir, version) -> int:
    existing = model_dir.saved_model_versions()
    if version is None:
        return existing[-1] + 1 if existing else 1
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or version < 1:
        raise ModelDirError(f"SavedModel version must be a positive integer, got {version!r}")
    if int(version) in existing or os.path.exists(os.path.join(model_dir.saved_model_base,
                                                               str(version))):
        raise ModelDirError(f"{os.path.join(model_dir.saved_model_base, str(version))}: version "
                            f"{version} exists; refusing to overwrite it (choose another "
                            f"--version)")
    return int(version)


STAGING_PREFIX = ".export-"


def _process_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # running, as another user
        return True
    return True


def remove_abandoned_exports(model_dir: ModelDir) -> list:
    """Remove ``saved_model/.export-<pid>-*`` folders whose export process is gone (killed during
    an export); an export still running elsewhere keeps its folder. Returns the removed paths."""
    removed = []
    base = model_dir.saved_model_base
    for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
        pid = name[len(STAGING_PREFIX):].split("-", 1)[0]
        if not name.startswith(STAGING_PREFIX) or (pid.isdigit() and _process_is_running(int(pid))):
            continue
        shutil.rmtree(os.path.join(base, name), ignore_errors=True)
        logging.warning("%s: removed an export left unfinished by a process that is gone",
                        os.path.join(base, name))
        removed.append(os.path.join(base, name))
    return removed


def _write_saved_model(model_dir: ModelDir, config, generator, checkpoint: str, version,
                       refine_factor, refine_xla) -> str:
    remove_abandoned_exports(model_dir)
    version = _next_version(model_dir, version)
    atlas, atlas_labels = _load_atlas(model_dir, config)
    label_transfer = LabelTransfer(generator, config, atlas.data, atlas_labels.data)
    refinement = (Refinement.for_label_transfer(label_transfer, factor=int(refine_factor),
                                                jit_compile=bool(refine_xla))
                  if refine_factor else None)
    module = ServingModule(label_transfer, refinement)
    signatures = module.signatures()
    # Written under a non-numeric name, then renamed: TF Serving only loads numeric folders, so it
    # never sees a half-written version.
    try:
        os.makedirs(model_dir.saved_model_base, exist_ok=True)
        # The pid in the name lets a later export remove it if this process is killed.
        staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-",
                                   dir=model_dir.saved_model_base)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the server may run as another user
    except OSError as e:
        raise ModelDirError(f"{model_dir.saved_model_base}: cannot write ({e.strerror or e})") \
            from None
    final = os.path.join(model_dir.saved_model_base, str(version))
    try:
        tf.saved_model.save(module, staging, signatures=signatures)
        metadata_path = os.path.join(staging, METADATA_PATH)
        os.makedirs(os.path.dirname(metadata_path), exist_ok=True)
        with open(metadata_path, "w") as f:
            metadata = serving_metadata(config, signatures,
                                        os.path.relpath(checkpoint, model_dir.path), version,
                                        refinement, model_dir.load_label_names())
            json.dump(metadata, f, indent=2)
            f.write("\n")
        if os.path.exists(final):
            raise ModelDirError(f"{final}: appeared during the export; refusing to overwrite it")
        os.rename(staging, final)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    logging.info("wrote SavedModel %s (from %s)", final, checkpoint)
    return final


def export_saved_model(model_dir, *, which: str = "auto", version=None,
                       refine_factor=RefinementSettings().factor,
                       refine_xla: bool = REFINE_XLA) -> str:
    """Write ``RUN/saved_model/<version>/`` (next free version unless given); returns its path.

    ``refine_factor``: grid factor of the ``segment_refined`` signature; 0/None leaves it out.
    ``refine_xla``: XLA-compile its step (see ``REFINE_XLA``).
    """
    model_dir = checked_model_dir(model_dir)
    config, generator, checkpoint = restore_for_export(model_dir, which)
    return _write_saved_model(model_dir, config, generator, checkpoint, version, refine_factor,
                              refine_xla)


def export_all(model_dir, which: str = "auto", *, version=None,
               refine_factor=RefinementSettings().factor, refine_xla: bool = REFINE_XLA) -> dict:
    """Both exports from one restore: {'saved_model', 'generator_h5', 'checkpoint'} paths."""
    model_dir = checked_model_dir(model_dir)
    config, generator, checkpoint = restore_for_export(model_dir, which)
    return {
        "saved_model": _write_saved_model(model_dir, config, generator, checkpoint, version,
                                          refine_factor, refine_xla),
        "generator_h5": write_generator_h5(model_dir, generator),
        "checkpoint": checkpoint,
    }
