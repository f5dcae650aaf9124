"""Prediction: scans on any grid -> segmentations on their own grids. ``predict.py`` is a thin
layer on ``predict_files``; ``Predictor`` is the per-scan pipeline, usable on its own.

One scan goes through (``Predictor.segment``):

    check     the scan is a plausible skull-stripped brain (or on the atlas grid)   alignment.py
    align     rigid + affine to the atlas, unless it is on the atlas grid already   alignment.py
    network   G_F's displacement on its working grid                                sources.py
    refine    Adam on the displacement, coarse to fine (optional)                   refinement.py
    pull      the atlas labels onto the scan's own voxels, one interpolation        native.py

``predict_files`` checks every input before anything is written, then runs the scans in turn and
writes the per-scan files (``outputs.py``) and the tables (``reports.py``).
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import time

import numpy as np
import tensorflow as tf

from ltnet_tf import alignment as alignment_lib
from ltnet_tf import data, evaluation, inference, reports
from ltnet_tf.config import RefinementSettings
from ltnet_tf.modeldir import ModelDir
from ltnet_tf.native import NativeLabelPull, structure_volumes_mm3
from ltnet_tf.outputs import OutputFolder
from ltnet_tf.refinement import ScanRefiner
from ltnet_tf.sources import RunFolderNetwork


class Predictor:
    """A scan on any grid -> its segmentation on that grid, with one trained network.

    ``network``: a ``sources.RunFolderNetwork`` (G_F with its config and atlas); ``align``:
    'auto' (align scans that are not on the atlas grid) or 'never'; ``refinement``: a
    ``config.RefinementSettings``, or None to segment with the network alone.
    """

    def __init__(self, network: RunFolderNetwork, *, align: str = "auto",
                 refinement: RefinementSettings = None,
                 alignment_settings: alignment_lib.AlignmentSettings = None):
        if align not in ("auto", "never"):
            raise ValueError(f"align must be auto or never, got {align!r}")
        self.network = network
        self.config, self.atlas = network.config, network.atlas
        self.align_mode = align
        self.aligner = alignment_lib.AtlasAligner(
            self.atlas, alignment_settings or alignment_lib.AlignmentSettings())
        self.pull = NativeLabelPull(network.atlas_labels.data)
        self.refiner = (ScanRefiner(self.config, self.atlas.data, refinement)
                        if refinement is not None else None)

    @classmethod
    def from_model_dir(cls, model_dir, *, source: str = "auto", checkpoint: str = "auto",
                       **options) -> "Predictor":
        """The predictor of a run folder; ``options`` as ``__init__``. Raises ModelDirError."""
        return cls(RunFolderNetwork(model_dir, source=source, checkpoint=checkpoint), **options)

    @property
    def label_ids(self) -> list:
        return self.config.label_ids

    def refinement_record(self):
        """The refinement's settings for prediction.json, or None without refinement."""
        return None if self.refiner is None else self.refiner.settings()

    def needs_alignment(self, scan: data.Volume) -> bool:
        return self.align_mode == "auto" and not alignment_lib.on_atlas_grid(self.atlas, scan)

    def check(self, scan: data.Volume) -> None:
        """Cheap checks before anything is written: the grid (without alignment) or the brain's
        plausibility. Raises DataError naming the scan."""
        if self.needs_alignment(scan):
            self.aligner.check_brain(scan)
        elif tuple(scan.shape) != tuple(self.atlas.shape):
            raise data.DataError(f"{scan.path}: shape {tuple(scan.shape)} differs from the atlas "
                                 f"grid {tuple(self.atlas.shape)} (use --align auto to "
                                 f"align scans on other grids)")

    def segment(self, scan: data.Volume, *, keep_aligned: bool = False,
                extras: bool = False) -> dict:
        """One scan -> {'segmentation' [scan grid] label IDs, 'alignment', 'seconds' {stage: s}},
        with ``keep_aligned`` also 'aligned_scan', 'aligned_segmentation' (atlas grid), with
        ``extras`` 'flow' [D, H, W, 3] and 'warped_atlas' [D, H, W, 1] (atlas grid)."""
        seconds = {}
        start = time.time()
        alignment = (self.aligner.align(scan) if self.needs_alignment(scan)
                     else alignment_lib.identity(self.atlas, scan))
        aligned = alignment.resample_scan(scan)
        seconds["align"] = time.time() - start
        result = {"alignment": alignment, "seconds": seconds}
        if alignment.skipped and self.refiner is None and not keep_aligned:
            start = time.time()  # network and label warp in one call (one graph)
            result.update(self.network.segment(aligned, extras=extras))
            seconds["network_and_labels"] = time.time() - start
            return result
        flow = self._displacement(aligned, seconds)
        start = time.time()
        atlas_grid_labels = None
        if alignment.skipped or keep_aligned:
            atlas_grid_labels = inference.warp_labels(self.pull.atlas_labels, flow[None],
                                                      self.pull.atlas_cells)[0].numpy()
        result["segmentation"] = (atlas_grid_labels if alignment.skipped else
                                  self.pull(flow, alignment.scan_voxel_to_atlas_voxel, scan.shape))
        seconds["labels"] = time.time() - start
        if keep_aligned:
            result.update(aligned_scan=aligned, aligned_segmentation=atlas_grid_labels)
        if extras:
            result.update(flow=flow, warped_atlas=self._warped_atlas(flow))
        return result

    def _displacement(self, aligned: data.Volume, seconds: dict) -> np.ndarray:
        """G_F's displacement (refined, if asked) on the atlas grid [D, H, W, 3], full voxels."""
        start = time.time()
        flow_working = self.network.working_displacement(aligned)
        if self.refiner is None:
            flow = inference.resample_displacement(
                tf.constant(flow_working[None]), self.config.downsample,
                self.atlas.shape)[0].numpy()
        seconds["network"] = time.time() - start
        if self.refiner is not None:
            start = time.time()
            flow = self.refiner(aligned, flow_working)
            seconds["refine"] = time.time() - start
        return flow

    def _warped_atlas(self, flow: np.ndarray) -> np.ndarray:
        atlas = data.normalize_intensity(tf.constant(
            self.atlas.data[None, ..., None], tf.float32))[0, ..., 0]
        return inference.warp_image(atlas, flow[None])[0].numpy()


# ------------------------------------------------------------------------------- files -> files
def check_scans(pairs, predictor: Predictor) -> None:
    """Read every scan (and reference label map) once before anything is written, so a bad file
    stops the run with its own message instead of leaving part of the outputs behind."""
    names = {}
    for image_path, label_path in pairs:
        name = data.scan_name(image_path)
        if name in names:
            raise data.DataError(f"{image_path}: same scan name '{name}' as {names[name]} (both "
                                 f"would be written to {name}_seg.nii.gz)")
        names[name] = image_path
        scan = data.load_scan(image_path)
        predictor.check(scan)
        if label_path:
            data.check_same_grid(scan, data.load_label_map(label_path), strict=False)


def refinement_settings(refine: bool, steps=None, coarse_steps=None, factor=None):
    """predict.py's refinement: RefinementSettings' defaults with the flags given (None keeps a
    default); None when refinement is off or every step count is 0."""
    if not refine or (steps == 0 and coarse_steps == 0):
        return None
    return RefinementSettings().replace(steps=steps, coarse_steps=coarse_steps, factor=factor)


def predict_files(model_dir, images, output_dir, labels=None, *, source="auto", checkpoint="auto",
                  save_warped_atlas=False, save_flow=False, save_aligned=False, align="auto",
                  refine=True, refine_steps=None, refine_coarse_steps=None,
                  refine_factor=None) -> dict:
    """Segment ``images`` (a folder, files, or comma-separated files; any grid) with the run folder
    ``model_dir`` into ``output_dir``; returns {'outputs': {scan: path}, 'dice': dice.json's
    content or None, 'scans': {scan: record}}.

    Writes per scan the files listed in ``ltnet_tf.outputs`` and for the run ``volumes.csv``,
    ``prediction.json`` and, with reference label maps ``labels`` (matched by file name),
    ``dice.csv`` and ``dice.json``. Every input and the model are checked before the output folder
    is created or written to. Raises DataError (a scan, a label map, the output folder),
    ModelDirError (the run folder), ConfigError (refinement settings).
    """
    output = OutputFolder(output_dir)
    images = output.scans_among(images)
    pairs = (data.pair_images_and_labels(images, labels) if labels
             else [(path, None) for path in data.list_images(images)])
    ModelDir(model_dir).check().load_config()  # cheap checks first, then the model itself
    predictor = Predictor.from_model_dir(
        model_dir, source=source, checkpoint=checkpoint, align=align,
        refinement=refinement_settings(refine, refine_steps, refine_coarse_steps, refine_factor))
    check_scans(pairs, predictor)
    output.prepare()
    save = dict(save_aligned=save_aligned, save_warped_atlas=save_warped_atlas,
                save_flow=save_flow)
    records, per_scan, volumes = {}, {}, {}
    for number, (image_path, label_path) in enumerate(pairs, start=1):
        name = data.scan_name(image_path)
        records[name], volumes[name], dice = _predict_scan(predictor, output, image_path,
                                                           label_path, save)
        if dice is not None:
            per_scan[name] = dice
        print(_progress_line(number, len(pairs), name, records[name], predictor), flush=True)
    return _write_reports(output, predictor, pairs, labels, align, records, per_scan, volumes)


def _predict_scan(predictor: Predictor, output: OutputFolder, image_path, label_path,
                  save: dict) -> tuple:
    """(record, volumes, Dice per label or None) of one scan, its files written."""
    start = time.time()
    scan = data.load_scan(image_path)
    name = data.scan_name(image_path)
    result = predictor.segment(scan, keep_aligned=save["save_aligned"],
                               extras=save["save_warped_atlas"] or save["save_flow"])
    path = output.write_scan(name, scan, result, predictor.atlas.affine, **save)
    alignment = result["alignment"]
    volumes = structure_volumes_mm3(result["segmentation"], scan.affine, predictor.label_ids)
    seconds = {stage: round(value, 3) for stage, value in result["seconds"].items()}
    seconds["total"] = round(time.time() - start, 3)
    record = {"image": os.path.abspath(image_path), "output": os.path.abspath(path),
              "alignment": alignment.to_dict(), "alignment_ok": alignment.ok, "seconds": seconds}
    dice = None
    if label_path:
        reference = data.load_label_map(label_path)
        reports.warn_unmatched_label_ids(reference, predictor.label_ids)
        dice = evaluation.dice_per_label(result["segmentation"], reference.data,
                                         predictor.label_ids)
        record["mean_dice"] = reports.finite_or_none(
            evaluation.mean_dice(dice, reports.mean_labels(predictor.label_ids)))
    return record, volumes, dice


def _progress_line(number: int, total: int, name: str, record: dict, predictor) -> str:
    alignment, seconds = record["alignment"], record["seconds"]
    where = "atlas grid" if alignment["skipped"] else (
        f"aligned in {alignment['seconds']:.1f} s, brain overlap {alignment['brain_overlap']:.2f}")
    if "refine" in seconds:
        where += f"; refined in {seconds['refine']:.1f} s"
    line = f"[{number}/{total}] {name}_seg.nii.gz ({where}; {seconds['total']:.1f} s)"
    if not record["alignment_ok"]:
        line += " ALIGNMENT LOOKS WRONG: check this scan"
    if "mean_dice" in record:
        over = reports.mean_labels(predictor.label_ids)
        mean = record["mean_dice"]
        line += f": mean Dice {float('nan') if mean is None else mean:.3f} over {len(over)} structures"
    return line


def _write_reports(output: OutputFolder, predictor: Predictor, pairs, labels, align, records,
                   per_scan, volumes) -> dict:
    label_ids = predictor.label_ids
    report = reports.write_dice_reports(per_scan, label_ids, output.path) if per_scan else None
    if report is None:
        reports.remove_earlier_dice_reports(output.path)
    reports.write_volumes_csv(volumes, label_ids, output.path)
    outputs = {name: record["output"] for name, record in records.items()}
    reports.write_prediction_json(
        output.path, model_dir=predictor.network.model_dir.path, source=predictor.network.source,
        images=[os.path.abspath(p) for p, _ in pairs],
        labels=[os.path.abspath(p) for _, p in pairs] if labels else None,
        outputs=outputs, align=align, alignment_settings=predictor.aligner.settings.to_dict(),
        refinement=predictor.refinement_record(),
        alignment_failed=[n for n, r in records.items() if not r["alignment_ok"]],
        scans=records, mean_dice=report["mean_dice"] if report else None)
    return {"outputs": outputs, "dice": report, "scans": records}
