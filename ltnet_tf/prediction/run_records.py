"""What a prediction run keeps per scan and writes at the end: the scan's record (alignment,
seconds per stage, refinement, volumes, Dice, warnings, QC picture), and the run's tables
(``reports``) and page (``report``). ``cohort.predict_files`` drives it.
"""
from __future__ import annotations

import contextlib
import logging as pylogging
import os
import time
from typing import Optional

from absl import logging

from ltnet_tf.config import ConfigError
from ltnet_tf.files import file_digest
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.registration.native import structure_volumes_mm3
from ltnet_tf.reporting import tables as reports
from ltnet_tf.serving.modeldir import ModelDir


# What made a scan's labels, as volumes.csv and prediction.json say it.
LABELS_BY = {"transfer": "label transfer",
             "intensity_model": "label transfer + intensity model"}


def timed_load(path: str) -> tuple:
    """(scan Volume, seconds to read it)."""
    start = time.time()
    return data.load_scan(path), time.time() - start


@contextlib.contextmanager
def collected_warnings():
    """The one-line warnings logged meanwhile (they are also shown as usual), for the record."""
    found = []

    class Collect(pylogging.Handler):
        def emit(self, record):
            found.append(record.getMessage().splitlines()[0])

    handler = Collect(level=pylogging.WARNING)
    logger = logging.get_absl_logger()
    logger.addHandler(handler)
    try:
        yield found
    finally:
        logger.removeHandler(handler)


class RunRecords:
    """One prediction run: segments scan files one by one (``add``), keeps their records,
    volumes and Dice, and writes the run's tables at the end (``write``)."""

    def __init__(self, output, predictor, names: LabelNames, options, run: Optional[ModelDir],
                 network):
        """``output``: an ``outputs.OutputFolder``; ``predictor``: a ``prediction.Predictor``;
        ``options``: ``cohort.PredictOptions``; ``run``, ``network``: the run folder and its G_F
        (None without a network)."""
        self.output, self.predictor, self.names, self.options = output, predictor, names, options
        self.run, self.network = run, network
        self.label_ids = predictor.label_ids
        self.over = reports.mean_labels(self.label_ids)
        self.probability_labels = probability_labels(options.probabilities, self.label_ids)
        self.records, self.volumes, self.dice = {}, {}, {}
        self.compute = None  # ``determinism.fix_threads()``'s record, when the caller fixed them

    def keep(self, name: str, record: dict, volumes: dict, dice, earlier: bool = True) -> None:
        """Take a scan finished by an earlier run (``journal``) as if segmented now; with
        ``earlier`` False, one another job of this run segmented (``--jobs N``): as its own."""
        self.records[name] = {**record, "kept_from_earlier_run": True} if earlier else record
        self.volumes[name] = volumes
        if dice is not None:
            self.dice[name] = dice

    def add(self, image_path: str, label_path, scan: data.Volume = None,
            reading: dict = None) -> dict:
        """Segment one scan file (``scan``: it, read already, ``reading``: {'read', 'wait'}
        seconds) and write its files; returns its record. Per-stage seconds: read (in the
        background when read ahead), wait (for it), the predictor's stages, write, scores, qc, and
        the total on the way: the wait and everything after it."""
        start, options = time.time(), self.options
        name = data.scan_name(image_path)
        with collected_warnings() as warnings:
            if scan is None:
                scan, read = timed_load(image_path)
                reading = {"read": read, "wait": 0.0}  # already inside this scan's clock
            result = self.predictor.segment(
                scan, keep_aligned=options.save_aligned,
                extras=options.save_warped_atlas or options.save_flow,
                probabilities=self.probability_labels)
            stage = time.time()
            path = self.output.write_scan(
                name, scan, result, self.predictor.atlas.affine,
                save_aligned=options.save_aligned, save_warped_atlas=options.save_warped_atlas,
                save_flow=options.save_flow)
            if self.probability_labels:
                self.output.write_probabilities(name, scan, result["probabilities"])
            result["seconds"].update(write=time.time() - stage, **reading)
            stage = time.time()
            dice = self._dice(result["segmentation"], label_path)
            self.volumes[name] = structure_volumes_mm3(result["segmentation"], scan.affine,
                                                       self.label_ids)
            result["seconds"]["scores"] = time.time() - stage
        record = self._record(image_path, path, result, warnings, dice)
        if options.qc:
            qc_start = time.time()
            prepared = result.get("prepared")
            self._qc_picture(name, scan, result["segmentation"], warnings,
                             None if prepared is None or prepared.brain_mask is None
                             else prepared.brain_mask.mask)
            record["qc_png"] = f"{name}_qc.png"
            record["seconds"]["qc"] = round(time.time() - qc_start, 3)
        record["seconds"]["total"] = round(time.time() - start + reading["wait"], 3)
        self.records[name] = record
        return {**record, "dice_over": self.over}

    def _dice(self, segmentation, label_path):
        if not label_path:
            return None
        reference = data.load_label_map(label_path)
        reports.warn_unmatched_label_ids(reference, self.label_ids)
        return evaluation.dice_per_label(segmentation, reference.data, self.label_ids)

    def _record(self, image_path, path, result, warnings, dice) -> dict:
        name = data.scan_name(image_path)
        alignment = result["alignment"]
        record = {"image": os.path.abspath(image_path), "output": os.path.abspath(path),
                  "alignment": alignment.to_dict(), "alignment_ok": alignment.ok,
                  "seconds": {stage: round(value, 3) for stage, value in result["seconds"].items()},
                  "refinement": _refinement_figures(result["refinement"]),
                  "volumes_mm3": {self.names.name(label): round(value, 1)
                                  for label, value in self.volumes[name].items()},
                  "warnings": list(warnings), "similarity": result.get("similarity", "ncc"),
                  "intensity_model": result.get("intensity_model")}
        prepared = result.get("prepared")
        if prepared is not None and prepared.changed:
            record.update(prepared.to_dict())
            record["brain_mask_ok"] = prepared.brain_mask is None or prepared.brain_mask.ok
        if dice is not None:
            self.dice[name] = dice
            record["mean_dice"] = reports.finite_or_none(evaluation.mean_dice(dice, self.over))
            record["dice"] = {self.names.name(label): reports.finite_or_none(value)
                              for label, value in dice.items()}
        return record

    def _qc_picture(self, name, scan, segmentation, warnings, brain_mask=None) -> None:
        from ltnet_tf.reporting import qc  # matplotlib only when a picture is drawn

        colours = {int(i): self.names.colour(i) for i in self.label_ids if int(i) != 0}
        qc.save_scan_qc_png(scan, segmentation, self.output.join(f"{name}_qc.png"),
                            colours=colours, title=f"{name}: " + (
                                "segmenter labels" if self._segmenter else "transferred labels"),
                            warnings=warnings, brain_mask=brain_mask)

    @property
    def _segmenter(self):
        return getattr(self.predictor, "segmenter", None)

    def _labels_by(self):
        """volumes.csv's last column, per scan: what made its labels (None: the label transfer
        alone, for every scan, and no column)."""
        if self._segmenter:
            return {name: "segmenter" for name in self.volumes}
        if self.predictor.intensity_model is None:
            return None
        return {name: LABELS_BY["intensity_model"] if (self.records[name].get(
            "intensity_model") or {}).get("applied") else LABELS_BY["transfer"]
            for name in self.volumes}

    def _segmenter_record(self):
        """prediction.json's account of the segmenter (None without one)."""
        segmenter = self._segmenter
        if segmenter is None:
            return None
        from ltnet_tf.segmentation.segmenter import CONFIG, WEIGHTS, segmenter_folder

        folder = segmenter_folder(self.run.path)
        training = segmenter.training or {}
        return {"folder": folder, "config_sha256": file_digest(os.path.join(folder, CONFIG)),
                "weights_sha256": file_digest(os.path.join(folder, WEIGHTS)),
                "teacher": {k: v for k, v in training.get("teacher", {}).items()
                            if k in ("atlases", "fusion", "start")},
                "steps": training.get("fit", {}).get("steps"),
                "train_minutes": training.get("train_minutes")}

    def write(self, images: list, references) -> dict:
        """The run's tables and report, rows in the order of ``images``; -> predict_files'
        result."""
        order = [data.scan_name(path) for path in images]
        self.records, self.volumes, self.dice = ({name: table[name] for name in order
                                                  if name in table}
                                                 for table in (self.records, self.volumes,
                                                               self.dice))
        suffix = "" if self.options.shard is None else ".shard-{}-of-{}".format(*self.options.shard)
        report = (reports.write_dice_reports(self.dice, self.label_ids, self.output.path,
                                             self.names, suffix) if self.dice else None)
        if report is None:
            reports.remove_earlier_dice_reports(self.output.path, suffix)
        reports.write_volumes_csv(self.volumes, self.label_ids, self.output.path, self.names,
                                  suffix, labels_by=self._labels_by())
        outputs = {name: record["output"] for name, record in self.records.items()}
        prediction = self._prediction(images, references, outputs, report)
        reports.write_prediction_json(self.output.path, prediction, suffix)
        if self.options.qc:
            from ltnet_tf.reporting import report as html_report

            html_report.write_report_html(self.output.path, prediction,
                                          path=self.output.join(f"report{suffix}.html"))
        return {"outputs": outputs, "dice": report, "scans": self.records}

    def producer(self) -> dict:
        """What made the outputs, by content (file digests, settings): shares of one cohort
        (``--shard``) must agree on it to be merged (``ltnet_tf.prediction.merge``)."""
        predictor, options = self.predictor, self.options
        network = None
        if self.network is not None:
            weights = self.network.source
            weights_file = (os.path.join(weights, "saved_model.pb") if os.path.isdir(weights)
                            else f"{weights}.index")
            network = {"config_sha256": file_digest(self.run.config_path),
                       "weights": os.path.basename(weights),
                       "weights_sha256": file_digest(weights_file)}
        return {"network": network, "segmenter": self._segmenter_record(),
                "atlases": [{"name": a.name, "image_sha256": file_digest(a.image.path),
                             "labels_sha256": file_digest(a.labels.path)}
                            for a in predictor.atlases.atlases],
                "align": options.align, "alignment_settings": predictor.aligner.settings.to_dict(),
                "refinement": predictor.refinement_record(),
                "fusion": options.fusion if len(predictor.atlases) > 1 else None,
                "preparation": options.preparation.to_dict(), "similarity": options.similarity,
                "intensity_model": predictor.intensity_model_record(),
                "label_names": self.names.to_dict(),
                "compute_threads": None if self.compute is None else self.compute["threads"]}

    def _prediction(self, images, references, outputs, report) -> dict:
        predictor, options = self.predictor, self.options
        return {
            "producer": self.producer(),
            "model_dir": None if self.run is None else self.run.path,
            "source": None if self.network is None else self.network.source,
            "network": self.network is not None,
            "labels_by": ("segmenter (RUN/segmenter, trained from the label transfer)"
                          if self._segmenter else LABELS_BY["intensity_model"]
                          if predictor.intensity_model is not None else LABELS_BY["transfer"]),
            "intensity_model": predictor.intensity_model_record(),
            "intensity_model_not_applied": [
                n for n, r in self.records.items()
                if r.get("intensity_model") and not r["intensity_model"]["applied"]],
            "segmenter": self._segmenter_record(),
            "atlases": predictor.atlases.records(),
            "fusion": options.fusion if len(predictor.atlases) > 1 else None,
            "label_names": self.names.source,
            "label_colours": {self.names.name(i): list(self.names.colour(i))
                              for i in self.label_ids if int(i) != 0},
            "images": [os.path.abspath(p) for p in images],
            "labels": None if references is None else [p and os.path.abspath(p)
                                                       for p in references],
            "outputs": outputs, "align": options.align,
            "alignment_settings": predictor.aligner.settings.to_dict(),
            "refinement": predictor.refinement_record(),
            "shard": None if options.shard is None else list(options.shard),
            "probabilities": None if not self.probability_labels else {
                "file": "<scan>_probabilities.nii.gz", "labels": self.probability_labels,
                "names": [self.names.name(i) for i in self.probability_labels]},
            "alignment_failed": [n for n, r in self.records.items() if not r["alignment_ok"]],
            "preparation": options.preparation.to_dict(),
            "brain_mask_flagged": [n for n, r in self.records.items()
                                   if not r.get("brain_mask_ok", True)],
            "scans": self.records,
            "mean_dice": report["mean_dice"] if report else None}


def probability_labels(asked, label_ids):
    """The label IDs to write probability maps of: ``asked`` (IDs, or ["all"]: every foreground
    atlas label), checked against the atlas's; None when none are asked."""
    if not asked:
        return None
    foreground = [int(i) for i in label_ids if int(i) != 0]
    if [str(a) for a in asked] == ["all"]:
        return foreground
    try:
        wanted = [int(a) for a in asked]
    except ValueError:
        raise ConfigError(f"--save_probabilities takes label IDs or 'all', got "
                          f"{','.join(map(str, asked))}") from None
    unknown = sorted(set(wanted) - set(foreground))
    if unknown:
        raise ConfigError(f"--save_probabilities: label IDs {unknown} are not among the atlas's "
                          f"({foreground[:12]}{' ...' if len(foreground) > 12 else ''})")
    return wanted


def _refinement_figures(refinement):
    """The primary atlas's refinement loss (start and end), and every atlas's when there are
    several; None without refinement."""
    if refinement is None:
        return None
    figures = {"loss_start": round(float(refinement["loss_start"][0]), 5),
               "loss": round(float(refinement["loss"][0]), 5)}
    if len(refinement["loss"]) > 1:
        figures["per_atlas"] = [{"loss_start": round(float(a), 5), "loss": round(float(b), 5)}
                                for a, b in zip(refinement["loss_start"], refinement["loss"])]
    return figures
