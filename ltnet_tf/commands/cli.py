"""Command lines: ``train_main(argv)`` and ``predict_main(argv)`` (absl flags -> config -> library).

Each command has its own ``FlagValues``, so both can live in one process (tests call them in turn).
Every hyperparameter flag is generated from ``LTNetConfig``; precedence is
preset < profile < ``--config`` JSON < explicit flags. Errors print one line and return exit code 1.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import signal
import sys

from absl import flags

from ltnet_tf.commands.config_flags import config_from_flags as _config_from_flags
from ltnet_tf.commands.config_flags import define_config_flags as _define_config_flags
from ltnet_tf.commands.config_flags import given_fields as _given_fields
from ltnet_tf.commands.runner import define_verbose_flag as _define_verbose_flag
from ltnet_tf.commands.runner import exit_now as _exit_now
from ltnet_tf.commands.runner import run_command as _run_command
from ltnet_tf.commands.runner import user_error as _user_error  # noqa: F401  (tests)
from ltnet_tf.commands.segmenter_command import define_segmenter_flags, train_segmenter_command
from ltnet_tf.config import PRESETS, PROFILES, ConfigError, RefinementSettings
from ltnet_tf.training.distribute import STRATEGIES



# ------------------------------------------------------------------------------- train
TRAIN_USAGE = ("Train LT-Net on one labelled atlas and a folder of unlabelled scans.\n"
               "usage: python train.py --atlas ATLAS.nii.gz [--atlas_labels LABELS.nii.gz] "
               "--unlabeled DIR --model_dir models/RUN [flags]")


def _train_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("atlas", None, "The labelled scan (NIfTI/MGZ). Several (comma-separated, "
                        "or a folder): G_F learns the first; the others are kept in the run "
                        "folder, and predict.py registers them too and fuses their labels.",
                        flag_values=fv)
    flags.DEFINE_string("atlas_labels", None, "Its label map (several: in the same order, or a "
                        "folder matched by file name); default: ATLAS_labels.nii.gz or "
                        "atlas_labels.nii.gz beside the atlas.", flag_values=fv)
    flags.DEFINE_string("unlabeled", None, "Folder (or comma-separated files) of unlabelled scans, "
                        "on any grid: scans not on the atlas grid are aligned to the atlas once "
                        "(cached in $LTNET_CACHE_DIR, default ~/.cache/ltnet_tf).", flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Run folder to create (or continue with --resume).",
                        flag_values=fv)
    flags.DEFINE_string("val_images", None, "Optional labelled validation scans (folder/files).",
                        flag_values=fv)
    flags.DEFINE_string("val_labels", None, "Their label maps, matched by file name.", flag_values=fv)
    flags.DEFINE_string("label_names", None, "Names (and colours) of the atlas's structures: a "
                        "FreeSurfer colour LUT, an ITK-SNAP label description file or a BIDS "
                        "dseg.tsv (default: FreeSurfer's names); kept in the run folder for "
                        "predict.py and the export.", flag_values=fv)
    flags.DEFINE_string("config", None, "JSON config to start from (e.g. another run's config.json).",
                        flag_values=fv)
    flags.DEFINE_enum("profile", "paper", list(PROFILES),
                      "Compute budget: 'paper' (full resolution, the paper's U-Net; for a GPU), "
                      "'cpu' (quarter resolution, slim U-Net, lr 1e-3, 1500 steps: well under an "
                      "hour on 2 CPU cores) or 'cpu_half' (the same at half resolution, ~3x "
                      "the time: a network that beats refinement alone where time is short).",
                      flag_values=fv)
    flags.DEFINE_enum("preset", "ltnet", list(PRESETS), "Ablation preset: which loss terms are on.",
                      flag_values=fv)
    flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its last checkpoint.",
                      flag_values=fv)
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      "tf.distribute strategy: one device, all local GPUs, or workers from TF_CONFIG.",
                      flag_values=fv)
    flags.DEFINE_bool("export", True, "Export the SavedModel and generator.h5 at the end.",
                      flag_values=fv)
    flags.DEFINE_enum("align", "auto", ["auto", "never"],
                      "auto: align scans on other grids to the atlas (rigid + affine); never: every "
                      "scan must be on the atlas grid.", flag_values=fv)
    _define_head_flags(fv, "Unlabelled scans stripped here are cached stripped, as scans on "
                            "other grids are cached aligned.")
    _define_verbose_flag(fv)
    _define_config_flags(fv)
    define_segmenter_flags(fv)
    return fv


def _train(fv: flags.FlagValues) -> int:
    from ltnet_tf.preprocessing.preparation import ScanPreparation
    from ltnet_tf.registration.alignment import AlignmentSettings
    from ltnet_tf.serving.modeldir import ModelDir
    from ltnet_tf.training import distribute, signals, trainer as training

    preparation = ScanPreparation(_preparation(fv), AlignmentSettings().min_tissue_ml)
    if fv.segmenter:
        return train_segmenter_command(fv, preparation)
    for name in ("atlas", "unlabeled", "model_dir"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required (see --helpfull)")
    if bool(fv.val_images) != bool(fv.val_labels):
        raise ConfigError("--val_images and --val_labels go together")
    from ltnet_tf.registration.atlases import atlas_files

    (atlas, atlas_labels), *extra_atlases = atlas_files(fv.atlas, fv.atlas_labels)
    config = _config_from_flags(fv)
    model_dir = ModelDir(fv.model_dir)
    if fv.resume and os.path.isfile(model_dir.config_path):
        # A plain --resume finishes the run as planned, not with the flags' defaults.
        config = model_dir.resume_config(config, _given_fields(fv))
    strategy = distribute.create_strategy(fv.strategy)
    # Keras's progress bar redraws with carriage returns: one line per checkpoint interval
    # reads better in a log file or a CI job.
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        with signals.stop_on_signals() as stop_request:  # SIGTERM, Ctrl-C: save the step, stop
            model_dir = training.train(
                config, atlas, atlas_labels, fv.unlabeled, fv.model_dir,
                val_images=fv.val_images, val_labels=fv.val_labels, resume=fv.resume,
                strategy=strategy, export=fv.export, verbose=verbose, align=fv.align,
                label_names=fv.label_names, extra_atlases=extra_atlases,
                stop_request=stop_request, preparation=preparation)
    except KeyboardInterrupt as stop:
        print(training.stopped_message(model_dir, stop), file=sys.stderr)
        return signals.exit_code(stop)
    if distribute.is_chief(strategy):  # other workers wrote nothing there
        print(f"model written to {model_dir.path}")
    return 0


def train_main(argv=None) -> int:
    return _run_command(_train, _train_flags(), argv, TRAIN_USAGE)


# ------------------------------------------------------------------------------- predict
PREDICT_USAGE = (
    "Segment scans by label transfer from a trained run folder and/or labelled atlases.\n"
    "usage: python predict.py --model_dir models/RUN --images DIR_OR_FILES --output_dir OUT "
    "[--labels DIR]\n"
    "   or: python predict.py --atlas A.nii.gz --atlas_labels L.nii.gz --images DIR_OR_FILES "
    "--output_dir OUT    (no training: refinement from the identity; several atlases are fused)")


def _predict_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("model_dir", None, "A run folder written by train.py (its G_F starts the "
                        "registration to its atlas). Without it, --atlas is needed and every "
                        "registration starts from the identity.", flag_values=fv)
    flags.DEFINE_string("atlas", None, "Labelled scan(s) to transfer labels from: a file, "
                        "comma-separated files, or a folder. With several, each is registered to "
                        "every scan and the labels are fused (--fusion); with --model_dir, these "
                        "are atlases besides the run's.", flag_values=fv)
    flags.DEFINE_string("atlas_labels", None, "Their label maps, in the same order (a folder: "
                        "matched by file name); default: <atlas>_labels.nii.gz or "
                        "atlas_labels.nii.gz beside each atlas.", flag_values=fv)
    flags.DEFINE_string("images", None, "Scans to segment: folder, file, or comma-separated files.",
                        flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where <scan>_seg.nii.gz files are written.",
                        flag_values=fv)
    flags.DEFINE_string("labels", None, "Optional reference label maps (matched by file name; "
                        "others are ignored, scans without one are left out of Dice): writes "
                        "dice.csv and dice.json.", flag_values=fv)
    flags.DEFINE_string("label_names", None, "Names (and colours) of the structures: a "
                        "FreeSurfer colour LUT, an ITK-SNAP label description file or a BIDS "
                        "dseg.tsv. Default: the run folder's, else FreeSurfer's names.",
                        flag_values=fv)
    flags.DEFINE_enum("fusion", "jlf", ["majority", "local", "jlf"], "Label fusion of several "
                      "atlases: joint label fusion (Wang et al. 2013; the most accurate on both "
                      "validation sets, bench/results/fusion.md), majority vote, or locally "
                      "weighted voting.",
                      flag_values=fv)
    flags.DEFINE_enum("source", "auto", ["auto", "saved_model", "checkpoint"],
                      "Run the exported SavedModel (auto: if present; what TF Serving runs) or "
                      "rebuild G_F from a checkpoint.", flag_values=fv)
    flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "last"],
                      "With --source checkpoint: best validation checkpoint or last.", flag_values=fv)
    flags.DEFINE_bool("save_warped_atlas", False, "Also write <scan>_warped_atlas.nii.gz.",
                      flag_values=fv)
    flags.DEFINE_bool("save_flow", False, "Also write <scan>_flow.nii.gz (displacement, voxels; "
                      "on the atlas grid for aligned scans).", flag_values=fv)
    flags.DEFINE_enum("align", "auto", ["auto", "never"],
                      "auto: align each scan to the atlas (rigid + affine) unless it is on the atlas "
                      "grid already, and write the segmentation on the scan's own grid; never: "
                      "scans must be on the atlas grid.", flag_values=fv)
    flags.DEFINE_bool("save_aligned", False, "Also write the atlas-space outputs: "
                      "<scan>_aligned.nii.gz (the scan on the atlas grid) and "
                      "<scan>_aligned_seg.nii.gz.", flag_values=fv)
    flags.DEFINE_list("save_probabilities", None, "Also write <scan>_probabilities.nii.gz: the "
                      "probability of each of these label IDs ('all': every structure; a byte per "
                      "voxel and structure) on the scan's grid: the intensity model's posterior, "
                      "or with --intensity_model off the fused share.", flag_values=fv)
    flags.DEFINE_bool("qc", True, "Write <scan>_qc.png (three slices with the segmentation's "
                      "outlines) and report.html (every scan, flagged ones first).",
                      flag_values=fv)
    _define_preparation_flags(fv)
    _define_refinement_flags(fv)
    _define_intensity_model_flag(fv)
    _define_cohort_flags(fv)
    _define_quality_flag(fv)
    _define_verbose_flag(fv)
    return fv


def _define_quality_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_float("min_quality", None, "Flag the scans whose expected Dice (predicted "
                       "without a reference: prediction.json 'quality', bench/results/quality.md) "
                       "is below this, as a failed alignment is flagged (default: the model's "
                       "threshold, chosen on its calibration data).", lower_bound=0.0,
                       upper_bound=1.0, flag_values=fv)


def _define_intensity_model_flag(fv: flags.FlagValues) -> None:
    flags.DEFINE_enum("intensity_model", "auto", ["auto", "off"],
                      "auto: the transferred labels are finished by a per-scan intensity model "
                      "(a Gaussian per structure fitted to the scan by EM, the transfer as its "
                      "prior; bench/results/intensity.md); off: the label transfer's labels as "
                      "they are.", flag_values=fv)


def _define_cohort_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("shard", None, "K/N: segment only the K-th of N shares of the sorted scan "
                        "list (for N processes or cluster jobs); the run's tables are written as "
                        "*.shard-K-of-N.* (join them with ltnet-merge).",
                        flag_values=fv)
    flags.DEFINE_integer("jobs", None, "Processes that segment the scans side by side, each with "
                         "TensorFlow's 2 fixed threads (the same bits as one process); default: "
                         "one per 2 cores this process may use, as far as the memory holds ~3 GB "
                         "each (1 on 2 cores). Combines with --shard.", lower_bound=1,
                         flag_values=fv)


def _define_head_flags(fv: flags.FlagValues, where: str) -> None:
    flags.DEFINE_enum("skull_strip", "auto", ["auto", "yes", "no"],
                      "Brain extraction (deepbet; pip install \"ltnet-tf[heads]\"): auto: of the "
                      "scans that look like whole heads (more tissue than a skull-stripped "
                      "brain); yes: of every scan; no: never (heads are refused). " + where,
                      flag_values=fv)
    flags.DEFINE_enum("bias_correction", "auto", ["auto", "yes", "no"],
                      "N4 bias-field correction on the brain mask: auto: of the scans that were "
                      "skull-stripped here; yes: of every scan; no: never.", flag_values=fv)


def _preparation(fv: flags.FlagValues):
    from ltnet_tf.preprocessing.preparation import PreparationOptions

    return PreparationOptions(skull_strip=fv.skull_strip, bias_correction=fv.bias_correction)


def _define_preparation_flags(fv: flags.FlagValues) -> None:
    _define_head_flags(fv, "The mask is written as <scan>_brainmask.nii.gz and drawn on the QC "
                           "picture.")
    flags.DEFINE_enum("similarity", "auto", ["auto", "ncc", "remap"],
                      "What refinement compares: ncc: the scan as it is (local NCC); remap: the "
                      "scan mapped to the atlas's contrast first (T2-, FLAIR-, PD-weighted "
                      "scans); auto: remap when the alignment check flags a contrast mismatch.",
                      flag_values=fv)


def _define_refinement_flags(fv: flags.FlagValues) -> None:
    defaults = RefinementSettings()
    flags.DEFINE_bool("refine", True, "Test-time refinement: Adam on each scan's displacement, on "
                      "the training objective, coarse to fine (bench/results/refinement.md); "
                      "--norefine segments with the network alone.", flag_values=fv)
    flags.DEFINE_integer("refine_steps", None, f"Refinement steps on the fine grid (default "
                         f"{defaults.steps}).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("refine_coarse_steps", None, f"Refinement steps on the coarse grid "
                         f"first (the network's working grid; default {defaults.coarse_steps}).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("refine_factor", None, f"Fine refinement grid: the atlas grid shrunk this "
                         f"many times (default {defaults.factor}).", lower_bound=1, flag_values=fv)


def _predict(fv: flags.FlagValues) -> int:
    from ltnet_tf.prediction.lock import parse_shard, refuse_if_taken

    if not fv.model_dir and not fv.atlas:
        raise ConfigError("--model_dir is required, or --atlas (with --atlas_labels) to segment "
                          "without a trained network (see --helpfull)")
    for name in ("images", "output_dir"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required (see --helpfull)")
    shard = parse_shard(fv.shard) if fv.shard else None
    refuse_if_taken(fv.output_dir, shard)  # a busy folder: refused before TensorFlow loads
    from ltnet_tf.prediction.cohort import PredictOptions, predict_files
    refine = fv.refine and not (fv.refine_steps == 0 and fv.refine_coarse_steps == 0)
    options = PredictOptions(
        source=fv.source, checkpoint=fv.checkpoint, align=fv.align, refine=refine,
        refinement=RefinementSettings().replace(steps=fv.refine_steps,
                                                coarse_steps=fv.refine_coarse_steps,
                                                factor=fv.refine_factor),
        fusion=fv.fusion, save_warped_atlas=fv.save_warped_atlas, save_flow=fv.save_flow,
        save_aligned=fv.save_aligned, qc=fv.qc, probabilities=fv.save_probabilities,
        shard=shard, preparation=_preparation(fv), similarity=fv.similarity, jobs=fv.jobs,
        intensity_model=fv.intensity_model, min_quality=fv.min_quality)
    if hasattr(signal, "SIGXFSZ"):  # a file-size limit: the write raises (one line), no kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    from ltnet_tf.training import signals

    try:
        with signals.stop_on_signals():  # SIGTERM too: one line, 143, from the first moment
            result = predict_files(fv.images, fv.output_dir, fv.labels, model_dir=fv.model_dir,
                                   atlas=fv.atlas, atlas_labels=fv.atlas_labels,
                                   label_names=fv.label_names, options=options)
    except KeyboardInterrupt as stop:  # SIGTERM or Ctrl-C: say what is kept
        done = (f" after {stop.finished} of {stop.total} scans" if hasattr(stop, "total")
                else "")
        print(f"predict.py stopped by {signal.Signals(signals.signal_number(stop)).name}{done}: "
              f"finished scans are kept; run the same command again to continue",
              file=sys.stderr)
        return signals.exit_code(stop)
    print(f"{len(result['outputs'])} segmentations written to {os.path.abspath(fv.output_dir)}")
    if result["dice"] is not None:
        mean = result["dice"]["mean_dice"]
        print(f"mean Dice {'n/a' if mean is None else f'{mean:.4f}'} (dice.csv, dice.json)")
    return 0


def predict_main(argv=None) -> int:
    return _run_command(_predict, _predict_flags(), argv, PREDICT_USAGE)


# ------------------------------------------------------------------------------- export
EXPORT_USAGE = ("Export a run folder for TF Serving (SavedModel) and VoxelMorph (generator.h5).\n"
                "usage: ltnet-export --model_dir RUN [--checkpoint auto|best|last] "
                "[--version N] [--refine_factor F] [--[no]refine_xla]")


def _export_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("model_dir", None, "Run folder written by train.py.", flag_values=fv)
    flags.DEFINE_enum("checkpoint", "auto", ["auto", "best", "last"],
                      "Checkpoint to export: best (validation Dice), last, or best if any, "
                      "else last.", flag_values=fv)
    flags.DEFINE_integer("version", None, "SavedModel version folder (default: newest + 1).",
                         lower_bound=1, flag_values=fv)
    flags.DEFINE_integer("refine_factor", RefinementSettings().factor,
                         "Grid factor of the segment_refined signature (test-time refinement); "
                         "0 exports none.", lower_bound=0, flag_values=fv)
    flags.DEFINE_bool("refine_xla", False,
                      "XLA-compile the refinement step of segment_refined (3x faster on CPU; TF "
                      "Serving then needs --xla_cpu_compilation_enabled=true).", flag_values=fv)
    _define_verbose_flag(fv)
    return fv


def _export(fv: flags.FlagValues) -> int:
    from ltnet_tf.serving import export

    if not fv.model_dir:
        raise ConfigError("--model_dir is required")
    paths = export.export_all(fv.model_dir, fv.checkpoint, version=fv.version,
                              refine_factor=fv.refine_factor, refine_xla=fv.refine_xla)
    print(f"SavedModel: {paths['saved_model']}\nVoxelMorph G_F: {paths['generator_h5']}\n"
          f"from checkpoint: {paths['checkpoint']}")
    return 0


def export_main(argv=None) -> int:
    """``ltnet-export --model_dir RUN``; returns the exit status."""
    return _run_command(_export, _export_flags(), argv, EXPORT_USAGE, program="ltnet-export")


def train_entry():  # console script
    sys.exit(train_main(sys.argv))


def predict_entry():  # console script and predict.py
    _exit_now(predict_main(sys.argv))


def export_entry():  # console script
    sys.exit(export_main(sys.argv))
