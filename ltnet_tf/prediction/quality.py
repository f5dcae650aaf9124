"""A segmentation's expected quality without a reference: an expected Dice per structure and per
scan, from the evidence the label transfer leaves (``quality_signals``).

A cohort user cannot look at every QC picture; what they need first is the list of scans to look
at. SynthSeg 2's ``--qc`` (Billot et al., PNAS 2023) predicts Dice per structure from its own
outputs for the same reason; reverse classification accuracy (Valindria et al., IEEE TMI 2017)
shows a segmentation's quality can be predicted without ground truth. Here the predictor is a small
fitted model:

    per structure   expected Dice = σ(b + Σ_k w_k · (t_k − c_k) / s_k)
                    t_k: a term, one signal or the product of two (``quality_signals``: the scan's
                    or the structure's), clipped to the range it spans in the fit data (a scan
                    unlike any of the calibration's is not extrapolated to ±∞), c_k, s_k its
                    centre and spread in the fit data; σ the logistic function, so every value
                    lies in (0, 1)
    per scan        the mean of its structures' expected Dice over the structures a mean Dice is
                    taken over (the 28 of the benchmark when the atlas has them, else all)

Its numbers (terms, b, w, c, s, the default threshold) live in ``quality_model.json`` beside this
module, written by ``python -m bench.quality`` (fitted on the training subjects of the shared
data and their degraded copies, scored on held-out subjects: bench/results/quality.md). The model
is fitted for predict.py's default label transfer (refinement, intensity model); it needs the
refinement's outputs, so without refinement (a network alone, or a segmenter) no quality is
estimated.
"""
from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

from ltnet_tf.io.evaluation import evaluation_labels
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.prediction.quality_evidence import AtlasFacts, TransferEvidence
from ltnet_tf.prediction.quality_signals import measure

MODEL_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quality_model.json")
LOW_STRUCTURES = 3  # the report and the scan's line name at most this many of its lowest


class QualityModelError(ValueError):
    """The model file is missing a field or holds something else."""


class QualityModel:
    """The fitted model (``quality_model.json``): ``predict(signals)`` -> expected Dice."""

    def __init__(self, spec: dict, path: str = "<dict>"):
        try:
            self.terms = [list(t) for t in spec["terms"]]
            self.centre = np.asarray(spec["centre"], np.float64)
            self.spread = np.asarray(spec["spread"], np.float64)
            self.low = np.asarray(spec["low"], np.float64)
            self.high = np.asarray(spec["high"], np.float64)
            self.weights = np.asarray(spec["weights"], np.float64)
            self.bias = float(spec["bias"])
            self.min_quality = float(spec["min_quality"])
        except (KeyError, TypeError, ValueError) as e:
            raise QualityModelError(f"{path}: not a quality model ({e})") from None
        sizes = {len(self.terms), len(self.centre), len(self.spread), len(self.weights),
                 len(self.low), len(self.high)}
        if len(sizes) != 1:
            raise QualityModelError(f"{path}: terms, centre, spread, low, high and weights differ "
                                    f"in length")
        self.spec, self.path = spec, path

    @classmethod
    def load(cls, path: str = MODEL_FILE) -> Optional["QualityModel"]:
        """The model in ``path``, or None when there is no such file (not fitted yet)."""
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return cls(json.load(f), path)

    def structure_values(self, signals: dict, label_ids) -> dict:
        """{label ID: expected Dice in (0, 1)} of every structure in ``signals`` (``label_ids``:
        the atlas's, which decide the structures a scan's means are taken over)."""
        found = {}
        for label, values in term_values(self.terms, signals, label_ids).items():
            clipped = np.clip(values, self.low, self.high)
            z = self.bias + float(np.dot(self.weights, (clipped - self.centre) / self.spread))
            found[label] = 1.0 / (1.0 + math.exp(-max(min(z, 40.0), -40.0)))
        return found

    def predict(self, signals: dict, label_ids) -> dict:
        """{'expected_dice': the scan's, over ``mean_over`` (structures of ``label_ids``: the
        benchmark's 28 when all are there), 'structures': {label ID: expected Dice}, 'low':
        [label IDs] its lowest structures, lowest first}. A structure the transfer did not
        place at all is expected at 0."""
        values = self.structure_values(signals, label_ids)
        over = evaluation_labels(label_ids, BENCHMARK_LABELS)
        structures = {int(label): round(values.get(int(label), 0.0), 4) for label in over}
        for label, value in values.items():
            structures.setdefault(int(label), round(value, 4))
        mean = float(np.mean([structures[label] for label in over])) if over else 0.0
        low = sorted(over, key=lambda label: (structures[label], label))[:LOW_STRUCTURES]
        return {"expected_dice": round(mean, 4), "structures": structures, "low": low}


def term_values(terms, signals: dict, label_ids) -> dict:
    """{label ID: [len(terms)] the terms' values} of every structure in ``signals``. A term is
    the product of its factors; a factor is a signal of the structure, of the scan, or
    ``mean_<structure signal>``: that signal's mean over the scan's structures (those a mean Dice
    is taken over: the benchmark's 28 when the atlas has them)."""
    structures = {int(k): v for k, v in signals["structures"].items()}
    over = [label for label in evaluation_labels(label_ids, BENCHMARK_LABELS)
            if label in structures]
    scan = dict(signals["scan"])
    for name in {f for term in terms for f in term if f.startswith("mean_")}:
        own = name[len("mean_"):]
        scan[name] = float(np.mean([structures[label][own] for label in over])) if over else 0.0
    return {label: np.array([math.prod(float(own[f] if f in own else scan[f]) for f in term)
                             for term in terms], np.float64)
            for label, own in structures.items()}


class QualityEstimator:
    """What ``Predictor.segment`` calls after a label transfer: the signals, and with a fitted
    model the expected Dice. ``atlases`` an ``AtlasSet``, ``factor`` the refinement's fine grid
    factor; ``model`` a ``QualityModel`` (default: the package's, or
    None before one is fitted)."""

    def __init__(self, atlases, factor: int, model: QualityModel = None):
        self.facts = AtlasFacts(atlases, factor)
        self.label_ids = atlases.label_ids
        self.model = model if model is not None else QualityModel.load()

    def __call__(self, evidence: TransferEvidence) -> dict:
        """{'signals': ``quality_signals.measure``'s, and with a model 'expected_dice',
        'structures', 'low' (``QualityModel.predict``)}."""
        signals = measure(evidence, self.facts)
        found = {"signals": signals}
        if self.model is not None:
            found.update(self.model.predict(signals, self.label_ids))
        return found


def scan_record(found: Optional[dict], name_of, min_quality: Optional[float]) -> Optional[dict]:
    """A scan's quality for prediction.json: {'expected_dice', 'structures' {name: expected
    Dice}, 'low' [{'structure', 'expected_dice'}] (lowest first), 'min_quality',
    'below_min_quality'}; None when nothing was estimated (no refinement, or no model).
    ``name_of``: label ID -> structure name."""
    if not found or "expected_dice" not in found:
        return None
    structures = found["structures"]
    below = min_quality is not None and found["expected_dice"] < min_quality
    return {"expected_dice": found["expected_dice"],
            "structures": {name_of(label): value for label, value in structures.items()},
            "low": [{"structure": name_of(label), "expected_dice": structures[label]}
                    for label in found["low"]],
            "min_quality": min_quality, "below_min_quality": bool(below)}


def with_threshold(record: Optional[dict], min_quality: Optional[float]) -> Optional[dict]:
    """A scan's quality record flagged against ``min_quality`` (a scan kept from an earlier run
    of the command may have been flagged against another threshold)."""
    if not record:
        return record
    below = min_quality is not None and record["expected_dice"] < min_quality
    return {**record, "min_quality": min_quality, "below_min_quality": bool(below)}


def describe(record: Optional[dict]) -> str:
    """'expected Dice 0.78 (lowest: Left-Pallidum 0.61, ...)' for the scan's line, or ''."""
    if not record:
        return ""
    low = ", ".join(f"{entry['structure']} {entry['expected_dice']:.2f}"
                    for entry in record["low"])
    return f"expected Dice {record['expected_dice']:.2f}" + (f" (lowest: {low})" if low else "")
