"""The tables and records of a prediction: ``dice.csv``/``dice.json`` (against reference label
maps), ``volumes.csv`` (structure volumes on each scan's own grid) and ``prediction.json`` (what
produced the outputs, and per scan the alignment, the timings and the scores).
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np
from absl import logging

from ltnet_tf.files import atomic_write, write_json
from ltnet_tf.io import evaluation
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.io.labels import BENCHMARK_LABELS

DICE_REPORTS = ("dice.csv", "dice.json")


def finite_or_none(value):
    """JSON has no NaN: a Dice that is undefined (structure in neither map) is written as null."""
    return float(value) if value is not None and math.isfinite(value) else None


def _nan_mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(sum(values) / len(values)) if values else float("nan")


def mean_labels(label_ids) -> list:
    """The structures a scan's mean Dice is taken over: the benchmark's 28 when the atlas has all
    of them, else every foreground atlas label."""
    return evaluation.evaluation_labels(label_ids, BENCHMARK_LABELS)


def write_dice_reports(per_scan: dict, label_ids, output_dir: str, names=None,
                       suffix: str = "") -> dict:
    """Writes ``dice<suffix>.csv`` (one row per scan and structure, then the scan's mean) and
    ``dice<suffix>.json`` into ``output_dir``; returns the JSON's content. ``names``: a
    ``label_names.LabelNames`` (default FreeSurfer's names).

    dice.json: ``scans`` {scan: {mean_dice, dice {label ID: Dice}}}, ``structures`` {label ID:
    {name, mean_dice}}, ``mean_dice`` (mean over scans) and ``mean_over_labels`` (the structures a
    scan's mean is taken over). Undefined Dice values are ``nan`` in the CSV and null in the JSON.
    """
    name = (names or LabelNames.freesurfer()).name
    over = mean_labels(label_ids)
    labels = [int(i) for i in label_ids if int(i) != 0]
    rows, report = [], {"mean_over_labels": over, "scans": {}, "structures": {}}
    for scan, scores in per_scan.items():
        scan_mean = evaluation.mean_dice(scores, over)
        report["scans"][scan] = {"mean_dice": finite_or_none(scan_mean),
                                 "dice": {str(k): finite_or_none(v) for k, v in scores.items()}}
        for label in labels:
            rows.append([scan, label, name(label), scores.get(label, float("nan"))])
        rows.append([scan, "mean", f"mean of {len(over)} structures", scan_mean])
    for label in labels:
        report["structures"][str(label)] = {
            "name": name(label),
            "mean_dice": finite_or_none(_nan_mean(s.get(label) for s in per_scan.values()))}
    report["mean_dice"] = finite_or_none(_nan_mean(v["mean_dice"]
                                                   for v in report["scans"].values()))
    with atomic_write(os.path.join(output_dir, f"dice{suffix}.csv"), newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["scan", "label", "structure", "dice"])
        for row in rows:
            writer.writerow([*row[:3], f"{row[3]:.6f}"])
    write_json(report, os.path.join(output_dir, f"dice{suffix}.json"))
    return report


def remove_earlier_dice_reports(output_dir: str, suffix: str = "") -> None:
    """A run without references: Dice reports of an earlier run there describe other
    segmentations."""
    for name in DICE_REPORTS:
        stem, extension = os.path.splitext(name)
        path = os.path.join(output_dir, f"{stem}{suffix}{extension}")
        if os.path.isfile(path):
            os.remove(path)
            logging.warning("%s: removed (from an earlier prediction with --labels; this one has "
                            "no reference labels)", path)


def write_volumes_csv(volumes: dict, label_ids, output_dir: str, names=None,
                      suffix: str = "", labels_by: dict = None) -> str:
    """``volumes<suffix>.csv``: one row per scan, one column per structure (by ``names``, default
    FreeSurfer's), mm³ on the scan's own grid — the table FastSurfer and SynthSeg users expect;
    with ``labels_by`` ({scan: e.g. "segmenter"}) a last column of that name saying what made
    each scan's labels. Returns its path."""
    name = (names or LabelNames.freesurfer()).name
    labels = [int(i) for i in label_ids if int(i) != 0]
    path = os.path.join(output_dir, f"volumes{suffix}.csv")
    with atomic_write(path, newline="") as f:
        writer = csv.writer(f)
        extra = [] if labels_by is None else ["labels_by"]
        writer.writerow(["scan", *[name(label) for label in labels], *extra])
        for scan, per_label in volumes.items():
            writer.writerow([scan, *[f"{per_label[label]:.1f}" for label in labels],
                             *([labels_by[scan]] if labels_by else [])])
    return path


def warn_unmatched_label_ids(reference, label_ids) -> None:
    """A reference whose IDs are not the atlas's (another labelling protocol) gives Dice 0 or
    none for those structures; the mean then drops for no reason the user would see."""
    atlas_ids = {int(i) for i in label_ids if int(i) != 0}
    reference_ids = {int(i) for i in np.unique(reference.data) if int(i) != 0}
    unknown, missing = sorted(reference_ids - atlas_ids), sorted(atlas_ids - reference_ids)
    if unknown:
        logging.warning("%s: reference label IDs %s are not among the atlas's; atlas IDs absent "
                        "from the reference: %s (their Dice is 0 or undefined)", reference.path,
                        unknown[:10], missing[:10])


def write_prediction_json(output_dir: str, prediction: dict, suffix: str = "") -> str:
    """``prediction<suffix>.json``: what produced the outputs (model or atlases, settings) and per
    scan its alignment, timings, refinement, volumes, Dice and warnings."""
    return write_json(prediction, os.path.join(output_dir, f"prediction{suffix}.json"))
