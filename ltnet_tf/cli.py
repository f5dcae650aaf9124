"""Command lines: ``train_main(argv)`` and ``predict_main(argv)`` (absl flags -> config -> library).

Each command has its own ``FlagValues``, so both can live in one process (tests call them in turn).
Every hyperparameter flag is generated from ``LTNetConfig``; precedence is
preset < profile < ``--config`` JSON < explicit flags. Errors print one line and return exit code 1.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import csv
import dataclasses
import json
import logging as pylogging
import math
import os
import re
import sys
import time
import typing

import numpy as np
from absl import flags, logging

from ltnet_tf.config import PRESETS, PROFILES, RESUME_CHANGEABLE, ConfigError, LTNetConfig

_RESOLVED_FIELDS = ("atlas_shape", "label_ids")  # set from the data, not by flags


# ------------------------------------------------------------------------------- flag plumbing
def _define_config_flags(flag_values: flags.FlagValues) -> None:
    hints = typing.get_type_hints(LTNetConfig)
    defaults = LTNetConfig()
    for f in dataclasses.fields(LTNetConfig):
        if f.name in _RESOLVED_FIELDS:
            continue
        default = getattr(defaults, f.name)
        text = f"{f.metadata['help']} (default: {default})"
        hint = hints[f.name]
        if hint is bool:
            flags.DEFINE_bool(f.name, None, text, flag_values=flag_values)
        elif hint is int:
            flags.DEFINE_integer(f.name, None, text, flag_values=flag_values)
        elif hint is float:
            flags.DEFINE_float(f.name, None, text, flag_values=flag_values)
        elif hint is str:
            flags.DEFINE_string(f.name, None, text, flag_values=flag_values)
        else:
            flags.DEFINE_list(f.name, None, text + " Comma-separated integers.",
                              flag_values=flag_values)


def _config_from_flags(flag_values: flags.FlagValues) -> LTNetConfig:
    config = LTNetConfig().replace(**PRESETS[flag_values.preset],
                                   **PROFILES[flag_values.profile])
    if flag_values.config:
        file_config = LTNetConfig.load(flag_values.config).to_dict()
        config = config.replace(**{k: v for k, v in file_config.items() if k not in _RESOLVED_FIELDS})
    changes = {}
    for f in dataclasses.fields(LTNetConfig):
        if f.name in _RESOLVED_FIELDS or flag_values[f.name].value is None:
            continue
        value = flag_values[f.name].value
        if isinstance(value, list):
            try:
                value = [int(v) for v in value]
            except ValueError:
                raise ConfigError(f"--{f.name} must be comma-separated integers, "
                                  f"got {','.join(value)!r}") from None
        changes[f.name] = value
    return config.replace(**changes)


def _parse(flag_values: flags.FlagValues, argv, usage: str):
    """Parse argv; returns None after printing help (then exit 0)."""
    argv = list(argv if argv is not None else sys.argv)
    if not argv or argv[0].startswith("-"):  # library call with flags only: no program name
        argv.insert(0, "ltnet")
    if any(a in ("--help", "--helpfull", "-h", "--helpshort") for a in argv[1:]):
        print(usage)
        print(flag_values.get_help())
        return None
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    return flag_values


def _user_error(error: Exception):
    """The one-line message of an error caused by the user's input, or None for a bug."""
    if isinstance(error, ConfigError):
        return str(error)
    # Imported here, not at the top: --helpfull and flag errors must not wait for TensorFlow.
    from ltnet_tf.data import DataError
    from ltnet_tf.modeldir import ModelDirError
    from ltnet_tf.training import TrainingError
    import tensorflow as tf

    if isinstance(error, (DataError, ModelDirError, TrainingError)):
        return str(error)
    if isinstance(error, tf.errors.OpError):
        # A scan that turned bad while tf.data was reading it: TF wraps our DataError in its own
        # error, with the Python traceback in the message; keep our line.
        found = re.search(r"\bDataError: ([^\n]+)", str(error))
        if found:
            return found.group(1).strip()
    return None


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _LtnetInfoOnly(pylogging.Filter):
    """absl INFO records from ltnet_tf pass; TensorFlow's own INFO chatter (checkpoint sharding,
    SavedModel tensor renaming, fingerprints) would bury the progress lines."""

    def filter(self, record):
        return (record.levelno >= pylogging.WARNING
                or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


_INFO_FILTER = _LtnetInfoOnly()


def _define_verbose_flag(flag_values: flags.FlagValues) -> None:
    # Read from sys.argv by ltnet_tf.compat before TensorFlow is imported; defined here for --help.
    flags.DEFINE_bool("verbose", False, "Show TensorFlow's start-up and C++ log lines (CUDA, "
                      "oneDNN); also shown when TF_CPP_MIN_LOG_LEVEL is set.",
                      flag_values=flag_values)


def _run_command(body, flag_values, argv, usage) -> int:
    try:
        parsed = _parse(flag_values, argv, usage)
        if parsed is None:
            return 0
        logging.set_verbosity(logging.INFO)
        if _INFO_FILTER not in logging.get_absl_logger().filters:
            logging.get_absl_logger().addFilter(_INFO_FILTER)
        return body(parsed)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (re-raised unless it is the user's input)
        message = _user_error(e)
        if message is None:
            raise
        first_line = (message.strip().splitlines() or [type(e).__name__])[0]
        print(f"error: {first_line}", file=sys.stderr)
        return 1


# ------------------------------------------------------------------------------- train
TRAIN_USAGE = ("Train LT-Net on one labelled atlas and a folder of unlabelled scans.\n"
               "usage: python train.py --atlas ATLAS.nii.gz [--atlas_labels LABELS.nii.gz] "
               "--unlabeled DIR --model_dir models/RUN [flags]")


def _train_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("atlas", None, "The labelled scan (NIfTI/MGZ).", flag_values=fv)
    flags.DEFINE_string("atlas_labels", None, "Its label map; default: ATLAS_labels.nii.gz or "
                        "atlas_labels.nii.gz beside the atlas.", flag_values=fv)
    flags.DEFINE_string("unlabeled", None, "Folder (or comma-separated files) of unlabelled scans, "
                        "on any grid: scans not on the atlas grid are aligned to the atlas once "
                        "(cached in $LTNET_CACHE_DIR, default ~/.cache/ltnet_tf).", flag_values=fv)
    flags.DEFINE_string("model_dir", None, "Run folder to create (or continue with --resume).",
                        flag_values=fv)
    flags.DEFINE_string("val_images", None, "Optional labelled validation scans (folder/files).",
                        flag_values=fv)
    flags.DEFINE_string("val_labels", None, "Their label maps, matched by file name.", flag_values=fv)
    flags.DEFINE_string("config", None, "JSON config to start from (e.g. another run's config.json).",
                        flag_values=fv)
    flags.DEFINE_enum("profile", "paper", list(PROFILES),
                      "Compute budget: 'paper' (full resolution, the paper's U-Net; for a GPU) or "
                      "'cpu' (quarter resolution, slim U-Net, lr 1e-3, 1500 steps: well under an "
                      "hour on 2 CPU cores).", flag_values=fv)
    flags.DEFINE_enum("preset", "ltnet", list(PRESETS), "Ablation preset: which loss terms are on.",
                      flag_values=fv)
    flags.DEFINE_bool("resume", False, "Continue the run in --model_dir from its last checkpoint.",
                      flag_values=fv)
    flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker"],
                      "tf.distribute strategy: one device, all local GPUs, or workers from TF_CONFIG.",
                      flag_values=fv)
    flags.DEFINE_bool("export", True, "Export the SavedModel and generator.h5 at the end.",
                      flag_values=fv)
    flags.DEFINE_enum("align", "auto", ["auto", "never"],
                      "auto: align scans on other grids to the atlas (rigid + affine); never: every "
                      "scan must be on the atlas grid.", flag_values=fv)
    _define_verbose_flag(fv)
    _define_config_flags(fv)
    return fv


def default_atlas_labels(atlas_path: str):
    from ltnet_tf.data import scan_name
    folder = os.path.dirname(os.path.abspath(atlas_path))
    for candidate in (f"{scan_name(atlas_path)}_labels.nii.gz", f"{scan_name(atlas_path)}_labels.mgz",
                      "atlas_labels.nii.gz"):
        path = os.path.join(folder, candidate)
        if os.path.isfile(path) and os.path.abspath(path) != os.path.abspath(atlas_path):
            return path
    return None


def _train(fv: flags.FlagValues) -> int:
    from ltnet_tf import distribute, signals, training
    from ltnet_tf.data import DataError
    from ltnet_tf.modeldir import ModelDir

    for name in ("atlas", "unlabeled", "model_dir"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required (see --helpfull)")
    if bool(fv.val_images) != bool(fv.val_labels):
        raise ConfigError("--val_images and --val_labels go together")
    if not os.path.exists(fv.atlas):
        raise DataError(f"{fv.atlas}: file not found")
    atlas_labels = fv.atlas_labels or default_atlas_labels(fv.atlas)
    if atlas_labels is None:
        raise ConfigError(f"{fv.atlas}: --atlas_labels not given and no "
                          f"<atlas>_labels.nii.gz / atlas_labels.nii.gz beside it")
    config = _config_from_flags(fv)
    saved_config = ModelDir(fv.model_dir).config_path
    if fv.resume and os.path.isfile(saved_config):
        # A plain --resume finishes the run as planned, not with the flags' defaults.
        config = _resume_config(fv, config, saved_config)
    strategy = distribute.create_strategy(fv.strategy)
    # Keras's progress bar redraws with carriage returns: one line per checkpoint interval
    # reads better in a log file or a CI job.
    verbose = 1 if sys.stdout.isatty() else 2
    try:
        with signals.stop_on_signals() as stop_request:  # SIGTERM, Ctrl-C: save the step, stop
            model_dir = training.train(config, fv.atlas, atlas_labels, fv.unlabeled, fv.model_dir,
                                       val_images=fv.val_images, val_labels=fv.val_labels,
                                       resume=fv.resume, strategy=strategy, export=fv.export,
                                       verbose=verbose, align=fv.align, stop_request=stop_request)
    except KeyboardInterrupt as stop:
        print(training.stopped_message(ModelDir(fv.model_dir), stop), file=sys.stderr)
        return signals.exit_code(stop)
    if training.is_chief(strategy):  # other workers wrote nothing there
        print(f"model written to {model_dir.path}")
    return 0


def _given_fields(fv: flags.FlagValues) -> set:
    """Config fields the user asked for: explicit flags, the --config file, an explicit --preset."""
    given = {f.name for f in dataclasses.fields(LTNetConfig)
             if f.name not in _RESOLVED_FIELDS and fv[f.name].present}
    if fv.config:
        given |= set(LTNetConfig.load(fv.config).to_dict()) - set(_RESOLVED_FIELDS)
    if fv["preset"].present:
        given |= set(PRESETS[fv.preset])
    return given


def _resume_config(fv: flags.FlagValues, asked: LTNetConfig, saved_path: str) -> LTNetConfig:
    """The run's saved config, with what --resume may change (``RESUME_CHANGEABLE``) applied and
    said; any other asked-for change (architecture, grid, loss terms) is refused, not dropped."""
    saved = LTNetConfig.load(saved_path)
    changes, refused = {}, []
    for name in sorted(_given_fields(fv)):
        old, new = getattr(saved, name), getattr(asked, name)
        if new == old:
            continue
        if name in RESUME_CHANGEABLE:
            changes[name] = new
        else:
            refused.append(f"{name} {old} -> {new}")
    if refused:
        raise ConfigError(f"{saved_path}: --resume cannot change {'; '.join(refused)} (only "
                          f"{', '.join(RESUME_CHANGEABLE)} can change in a run); start a new "
                          f"--model_dir with --config {saved_path} instead")
    if changes:
        print("resuming with " + ", ".join(f"{k}={getattr(saved, k)} -> {v}"
                                           for k, v in changes.items()), flush=True)
    return saved.replace(**changes)


def train_main(argv=None) -> int:
    return _run_command(_train, _train_flags(), argv, TRAIN_USAGE)


# ------------------------------------------------------------------------------- predict
PREDICT_USAGE = ("Segment scans with a trained LT-Net run folder.\n"
                 "usage: python predict.py --model_dir models/RUN --images DIR_OR_FILES "
                 "--output_dir OUT [--labels DIR]")


def _predict_flags() -> flags.FlagValues:
    fv = flags.FlagValues()
    flags.DEFINE_string("model_dir", None, "A run folder written by train.py.", flag_values=fv)
    flags.DEFINE_string("images", None, "Scans to segment: folder, file, or comma-separated files.",
                        flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Where <scan>_seg.nii.gz files are written.",
                        flag_values=fv)
    flags.DEFINE_string("labels", None, "Optional reference label maps (matched by file name): "
                        "writes dice.csv and dice.json.", flag_values=fv)
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
    flags.DEFINE_bool("refine", True, "Test-time refinement: Adam on each scan's displacement, on "
                      "the training objective, coarse to fine (+0.08 mean Dice on real brains for "
                      "about 3 CPU-seconds per scan, bench/results/refinement.md); --norefine "
                      "segments with the network alone.", flag_values=fv)
    flags.DEFINE_integer("refine_steps", None, "Refinement steps on the fine grid (default 10).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("refine_coarse_steps", None, "Refinement steps on the network's working "
                         "grid first (default 25).", lower_bound=0, flag_values=fv)
    flags.DEFINE_integer("refine_factor", None, "Fine refinement grid: the atlas grid shrunk this "
                         "many times (default 2).", lower_bound=1, flag_values=fv)
    _define_verbose_flag(fv)
    return fv


def _prepare_output_dir(path: str) -> str:
    from ltnet_tf.data import DataError
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DataError(f"{path}: cannot create output folder ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataError(f"{path}: output folder is not writable")
    return path


def _write_json(payload, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _finite_or_none(value):
    """JSON has no NaN: a Dice that is undefined (structure in neither map) is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _nan_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def write_dice_reports(per_scan: dict, label_ids, output_dir: str) -> dict:
    """dice.csv (one row per scan and structure, then the scan's mean) and dice.json.

    dice.json: ``scans`` {scan: {mean_dice, dice {label ID: Dice}}}, ``structures`` {label ID:
    {name, mean_dice}}, ``mean_dice`` (mean over scans) and ``mean_over_labels`` (the structures a
    scan's mean is taken over). Undefined Dice values are ``nan`` in the CSV and null in the JSON.
    """
    from ltnet_tf import evaluation
    from ltnet_tf.labels import BENCHMARK_LABELS, structure_name

    mean_labels = evaluation.evaluation_labels(label_ids, BENCHMARK_LABELS)
    labels = [int(i) for i in label_ids if int(i) != 0]
    rows, report = [], {"mean_over_labels": mean_labels, "scans": {}, "structures": {}}
    for scan, scores in per_scan.items():
        scan_mean = evaluation.mean_dice(scores, mean_labels)
        report["scans"][scan] = {"mean_dice": _finite_or_none(scan_mean),
                                 "dice": {str(k): _finite_or_none(v) for k, v in scores.items()}}
        for label in labels:
            rows.append([scan, label, structure_name(label), scores.get(label, float("nan"))])
        rows.append([scan, "mean", f"mean of {len(mean_labels)} structures", scan_mean])
    for label in labels:
        report["structures"][str(label)] = {
            "name": structure_name(label),
            "mean_dice": _finite_or_none(_nan_mean(s.get(label) for s in per_scan.values()))}
    report["mean_dice"] = _finite_or_none(_nan_mean(v["mean_dice"]
                                                    for v in report["scans"].values()))
    csv_path = os.path.join(output_dir, "dice.csv")
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan", "label", "structure", "dice"])
        for row in rows:
            writer.writerow([*row[:3], f"{row[3]:.6f}"])
    os.replace(csv_path + ".tmp", csv_path)
    _write_json(report, os.path.join(output_dir, "dice.json"))
    return report


def _check_scans(pairs, segmenter) -> None:
    """Read every scan (and reference label map) once before anything is written, so a bad file
    stops the run with its own message instead of leaving part of the outputs behind."""
    from ltnet_tf import data

    names = {}
    for image_path, label_path in pairs:
        name = data.scan_name(image_path)
        if name in names:
            raise data.DataError(f"{image_path}: same scan name '{name}' as {names[name]} (both "
                                 f"would be written to {name}_seg.nii.gz)")
        names[name] = image_path
        scan = data.load_scan(image_path)
        segmenter.check(scan)
        if label_path:
            data.check_same_grid(scan, data.load_label_map(label_path), strict=False)


OUTPUT_SUFFIXES = ("_seg", "_warped_atlas", "_flow", "_aligned")  # <scan><suffix>.nii.gz, as below


def _without_earlier_outputs(images, output_dir) -> list:
    """The scans, less the files an earlier prediction wrote into the output folder when it is
    also the scans' folder: they are segmentations, not scans (``v0_seg_seg.nii.gz``)."""
    from ltnet_tf import data

    output_dir = os.path.abspath(output_dir)
    scans, earlier = [], []
    for path in data.list_images(images):
        in_output = os.path.dirname(os.path.abspath(path)) == output_dir
        is_output = in_output and data.scan_name(path).endswith(OUTPUT_SUFFIXES)
        (earlier if is_output else scans).append(path)
    if earlier:
        logging.warning("%s: skipping %d earlier outputs of predict.py among the scans (%s)",
                        output_dir, len(earlier), ", ".join(os.path.basename(p) for p in earlier[:3])
                        + (", ..." if len(earlier) > 3 else ""))
    if not scans:
        raise data.DataError(f"{output_dir}: no scans besides earlier outputs of predict.py")
    return scans


def _warn_unmatched_label_ids(reference, label_ids) -> None:
    """A reference whose IDs are not the atlas's (another labelling protocol) gives Dice 0 or
    none for those structures; the mean then drops for no reason the user would see."""
    atlas_ids = {int(i) for i in label_ids if int(i) != 0}
    reference_ids = {int(i) for i in np.unique(reference.data) if int(i) != 0}
    unknown, missing = sorted(reference_ids - atlas_ids), sorted(atlas_ids - reference_ids)
    if unknown:
        logging.warning("%s: reference label IDs %s are not among the atlas's; atlas IDs absent "
                        "from the reference: %s (their Dice is 0 or undefined)", reference.path,
                        unknown[:10], missing[:10])


def _remove_earlier_dice_reports(output_dir: str) -> None:
    """A run without --labels: Dice reports of an earlier run there describe other segmentations."""
    for name in ("dice.csv", "dice.json"):
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            logging.warning("%s: removed (from an earlier prediction with --labels; this one has "
                            "no reference labels)", path)


def write_volumes_csv(volumes: dict, label_ids, output_dir: str) -> str:
    """volumes.csv: one row per scan, one column per structure (FreeSurfer name), mm³ on the scan's
    own grid — the table FastSurfer and SynthSeg users expect."""
    from ltnet_tf.labels import structure_name

    labels = [int(i) for i in label_ids if int(i) != 0]
    path = os.path.join(output_dir, "volumes.csv")
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan", *[structure_name(label) for label in labels]])
        for scan, per_label in volumes.items():
            writer.writerow([scan, *[f"{per_label[label]:.1f}" for label in labels]])
    os.replace(path + ".tmp", path)
    return path


def predict_files(model_dir, images, output_dir, labels=None, *, source="auto", checkpoint="auto",
                  save_warped_atlas=False, save_flow=False, save_aligned=False, align="auto",
                  refine=True, refine_steps=None, refine_coarse_steps=None,
                  refine_factor=None) -> dict:
    """Library form of predict.py; returns {'outputs': {scan: path}, 'dice': report or None,
    'scans': {scan: record}}.

    Scans on any grid: each is aligned to the atlas (unless it is on the atlas grid already) and its
    segmentation written on its own grid. Inputs and the model are all checked before the output
    folder is created or written to.
    """
    from ltnet_tf import data, evaluation, native
    from ltnet_tf.inference import Predictor
    from ltnet_tf.labels import BENCHMARK_LABELS
    from ltnet_tf.modeldir import ModelDir

    images = _without_earlier_outputs(images, output_dir)
    if labels:
        pairs = data.pair_images_and_labels(images, labels)
    else:
        pairs = [(path, None) for path in data.list_images(images)]
    ModelDir(model_dir).check().load_config()  # cheap checks first, then the model itself
    predictor = Predictor(model_dir, source=source, checkpoint=checkpoint)
    segmenter = native.NativeSegmenter(predictor, align=align)
    refinement = _refinement_settings(predictor, segmenter, refine, refine_steps,
                                      refine_coarse_steps, refine_factor)
    _check_scans(pairs, segmenter)
    _prepare_output_dir(output_dir)
    label_ids = predictor.config.label_ids
    mean_labels = evaluation.evaluation_labels(label_ids, BENCHMARK_LABELS)
    outputs, per_scan, volumes, records = {}, {}, {}, {}
    for number, (image_path, label_path) in enumerate(pairs, start=1):
        start = time.time()
        scan = data.load_scan(image_path)
        name = data.scan_name(image_path)
        result = segmenter.segment(scan, keep_aligned=save_aligned,
                                   extras=save_warped_atlas or save_flow)
        alignment = result["alignment"]
        path = os.path.join(output_dir, f"{name}_seg.nii.gz")
        data.save_nifti(result["segmentation"], scan.affine, path, header=scan.header)
        atlas_affine = predictor.atlas.affine
        if not alignment.skipped:
            affine_path = os.path.join(output_dir, f"{name}_affine.txt")
            with open(affine_path + ".tmp", "w") as f:
                f.write(alignment.itk_transform_text())
            os.replace(affine_path + ".tmp", affine_path)
        if save_aligned:
            data.save_nifti(result["aligned_scan"].data, atlas_affine,
                            os.path.join(output_dir, f"{name}_aligned.nii.gz"), dtype="float32")
            data.save_nifti(result["aligned_segmentation"], atlas_affine,
                            os.path.join(output_dir, f"{name}_aligned_seg.nii.gz"))
        if save_warped_atlas:  # atlas-grid outputs: the scan's grid when it was on the atlas grid
            data.save_nifti(result["warped_atlas"][..., 0],
                            scan.affine if alignment.skipped else atlas_affine,
                            os.path.join(output_dir, f"{name}_warped_atlas.nii.gz"),
                            dtype="float32")
        if save_flow:
            data.save_nifti(result["flow"], scan.affine if alignment.skipped else atlas_affine,
                            os.path.join(output_dir, f"{name}_flow.nii.gz"), dtype="float32")
        outputs[name] = os.path.abspath(path)
        volumes[name] = native.structure_volumes_mm3(result["segmentation"], scan.affine, label_ids)
        seconds = {stage: round(value, 3) for stage, value in result["seconds"].items()}
        seconds["total"] = round(time.time() - start, 3)
        records[name] = {"image": os.path.abspath(image_path), "output": outputs[name],
                         "alignment": alignment.to_dict(), "alignment_ok": alignment.ok,
                         "seconds": seconds}
        where = "atlas grid" if alignment.skipped else (
            f"aligned in {alignment.seconds:.1f} s, brain overlap {alignment.brain_overlap:.2f}")
        if "refine" in seconds:
            where += f"; refined in {seconds['refine']:.1f} s"
        message = f"[{number}/{len(pairs)}] {name}_seg.nii.gz ({where}; {seconds['total']:.1f} s)"
        if not alignment.ok:
            message += " ALIGNMENT LOOKS WRONG: check this scan"
        if label_path:
            reference = data.load_label_map(label_path)
            _warn_unmatched_label_ids(reference, label_ids)
            per_scan[name] = evaluation.dice_per_label(result["segmentation"], reference.data,
                                                       label_ids)
            scan_mean = evaluation.mean_dice(per_scan[name], mean_labels)
            records[name]["mean_dice"] = _finite_or_none(scan_mean)
            message += f": mean Dice {scan_mean:.3f} over {len(mean_labels)} structures"
        print(message, flush=True)
    report = write_dice_reports(per_scan, label_ids, output_dir) if per_scan else None
    if report is None:
        _remove_earlier_dice_reports(output_dir)
    write_volumes_csv(volumes, label_ids, output_dir)
    _write_json({"model_dir": predictor.model_dir.path, "source": predictor.source,
                 "images": [os.path.abspath(p) for p, _ in pairs],
                 "labels": [os.path.abspath(p) for _, p in pairs] if labels else None,
                 "outputs": outputs,
                 "align": align, "alignment_settings": segmenter.aligner.settings.to_dict(),
                 "refinement": refinement,
                 "alignment_failed": [n for n, r in records.items() if not r["alignment_ok"]],
                 "scans": records,
                 "mean_dice": report["mean_dice"] if report else None},
                os.path.join(output_dir, "prediction.json"))
    return {"outputs": outputs, "dice": report, "scans": records}


def _refinement_settings(predictor, segmenter, refine, steps, coarse_steps, factor):
    """Install test-time refinement on the segmenter; its settings for prediction.json."""
    if not refine or (steps == 0 and coarse_steps == 0):
        return None
    from ltnet_tf import refinement

    segmenter.refine = refinement.for_predictor(predictor, steps=steps, coarse_steps=coarse_steps,
                                                factor=factor)
    return segmenter.refine.settings()


def _predict(fv: flags.FlagValues) -> int:
    for name in ("model_dir", "images", "output_dir"):
        if not fv[name].value:
            raise ConfigError(f"--{name} is required (see --helpfull)")
    result = predict_files(fv.model_dir, fv.images, fv.output_dir, fv.labels, source=fv.source,
                           checkpoint=fv.checkpoint, save_warped_atlas=fv.save_warped_atlas,
                           save_flow=fv.save_flow, save_aligned=fv.save_aligned, align=fv.align,
                           refine=fv.refine, refine_steps=fv.refine_steps,
                           refine_coarse_steps=fv.refine_coarse_steps,
                           refine_factor=fv.refine_factor)
    print(f"{len(result['outputs'])} segmentations written to {os.path.abspath(fv.output_dir)}")
    if result["dice"] is not None:
        mean = result["dice"]["mean_dice"]
        print(f"mean Dice {'n/a' if mean is None else f'{mean:.4f}'} (dice.csv, dice.json)")
    return 0


def predict_main(argv=None) -> int:
    return _run_command(_predict, _predict_flags(), argv, PREDICT_USAGE)


def train_entry():  # console script
    sys.exit(train_main(sys.argv))


def predict_entry():  # console script
    sys.exit(predict_main(sys.argv))
