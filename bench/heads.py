"""Whole heads, bias fields and other contrasts through the prediction pipeline.

    python -m bench.heads [--sections brain_mask,bias,contrast]     # ~15-30 min on 2 CPU cores

Segmenting without a trained network (``predict.py --atlas``: the atlas of ../shared/data, test-time
refinement at its defaults), each scan on its own grid, Dice of the 28 benchmark structures.

- ``brain_mask``: the six heads of ../shared/data/heads through the product's preparation at its
  defaults (deepbet, then N4 on the mask): the mask's Dice against FreeSurfer's, the share of
  labelled brain (aseg > 0) left outside it, seconds (wall and the process's CPU) per head.
- ``from_head``: per head, Dice from the head (stripped and N4-corrected as above; and stripped
  without N4) against Dice from FreeSurfer's own skull-stripped scan of the same subject on the
  same grid (native/images), same settings.
- ``bias``: each head times a smooth field of +-25 % (``bench.contrasts.bias_field``, seed = the
  subject's number), through the same pipeline (with and without N4): Dice against the head's
  without the field.
- ``contrast``: sub-06/07 (native) and the six MICCAI validation scans, as they are (T1) and
  remapped to T2-, FLAIR- and PD-like contrasts (``bench.contrasts.remap_contrast``), segmented
  with the similarity the product picks for them (``--similarity auto``).

Each part records the load average at its start and end: timings taken while other jobs share the
cores are upper bounds. Writes bench/results/heads.json, .md.
"""
from __future__ import annotations

import os
import time

from ltnet_tf import compat  # noqa: F401

import numpy as np
from absl import app, flags

from bench import harness
from bench.contrasts import bias_field, remap_contrast
from bench.harness import table
from ltnet_tf.config import RefinementSettings
from ltnet_tf.io import evaluation, volumes as data
from ltnet_tf.io.labels import BENCHMARK_LABELS
from ltnet_tf.prediction.predictor import Predictor
from ltnet_tf.preprocessing.preparation import PreparationOptions, ScanPreparation
from ltnet_tf.registration.atlases import AtlasSet

HEADS = ("sub-01", "sub-02", "sub-04", "sub-05", "sub-06", "sub-07")
CONTRAST_SCANS = ("sub-06", "sub-07", "1000", "1001", "1002", "1006", "1007", "1008")
CONTRASTS = ("t1", "t2", "flair", "pd")
harness.define_flags("heads", work=False)
flags.DEFINE_list("sections", ["brain_mask", "bias", "contrast"], "What to measure (brain_mask "
                  "includes from_head).")
flags.DEFINE_list("heads", list(HEADS), "Heads to measure.")
flags.DEFINE_list("contrast_scans", list(CONTRAST_SCANS), "Scans remapped to other contrasts.")
FLAGS = flags.FLAGS
TARGETS = {"brain_mask_mean_dice": 0.93, "brain_mask_min_dice": 0.90,
           "brain_left_out_pct": 0.5, "seconds_per_head": 15.0, "from_head_difference": -0.01,
           "bias_difference": 0.01, "contrast_difference": 0.03}
VARIANTS = (("dice_n4", "with N4"), ("dice_no_n4", "without N4"))


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def mean_dice(segmentation, reference) -> float:
    scores = evaluation.dice_per_label(segmentation, reference, BENCHMARK_LABELS)
    return round(float(evaluation.mean_dice(scores, BENCHMARK_LABELS)), 4)


def mask_figures(mask, reference, labels) -> dict:
    brain = labels > 0
    dice = 2.0 * np.logical_and(mask, reference).sum() / (mask.sum() + reference.sum())
    return {"dice": round(float(dice), 4),
            "brain_left_out_pct": round(100.0 * float((brain & ~mask).sum()) / brain.sum(), 3)}


class Bench:
    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        atlases = AtlasSet.load([os.path.join(data_dir, "atlas.nii.gz")],
                                [os.path.join(data_dir, "atlas_labels.nii.gz")])
        self.predictor = Predictor(atlases, None, refinement=RefinementSettings())
        settings = self.predictor.aligner.settings
        self.prepare = ScanPreparation(PreparationOptions(), settings.min_tissue_ml)
        self.prepare_no_n4 = ScanPreparation(PreparationOptions(bias_correction="no"),
                                             settings.min_tissue_ml)

    def path(self, *parts) -> str:
        return os.path.join(self.data_dir, *parts)

    def segment(self, scan: data.Volume, reference) -> float:
        return mean_dice(self.predictor.segment(scan)["segmentation"], reference)

    def through_pipeline(self, head: data.Volume, reference, fs_mask=None) -> dict:
        """The head prepared (timed) and segmented, with N4 and without it."""
        start, cpu = time.time(), cpu_seconds()
        prepared = self.prepare(head)
        figures = {"seconds": round(time.time() - start, 2),
                   "cpu_seconds": round(cpu_seconds() - cpu, 2),
                   "extraction_seconds": round(prepared.brain_mask.seconds, 2),
                   "n4_seconds": prepared.bias["seconds"], "mask": prepared.brain_mask.to_dict()}
        if fs_mask is not None:
            figures.update(mask_figures(prepared.brain_mask.mask, fs_mask, reference))
        stripped = self.prepare_no_n4(head).scan  # deepbet is deterministic: the same mask
        figures["dice_n4"] = self.segment(prepared.scan, reference)
        figures["dice_no_n4"] = self.segment(stripped, reference)
        return figures

    def heads(self, with_bias: bool) -> dict:
        found = {}
        for name in FLAGS.heads:
            head = data.load_scan(self.path("heads", "images", f"{name}.nii.gz"))
            reference = data.load_label_map(self.path("heads", "labels", f"{name}.nii.gz")).data
            fs_mask = data.load_label_map(self.path("heads", "masks", f"{name}.nii.gz")).data > 0
            native = data.load_scan(self.path("native", "images", f"{name}.mgz"))
            entry = {"head": self.through_pipeline(head, reference, fs_mask),
                     "native_dice": self.segment(native, reference)}
            if with_bias:
                field = bias_field(head.shape, head.data > 0, 0.25, seed=int(name[-2:]))
                biased = data.Volume(head.data * field, head.affine, f"{name}_bias",
                                     header=head.header)
                entry["biased"] = self.through_pipeline(biased, reference, fs_mask)
            found[name] = entry
            print(name, entry, flush=True)
        return found

    def contrasts(self) -> dict:
        found = {}
        for name in FLAGS.contrast_scans:
            folder, extension = (("native", ".mgz") if name.startswith("sub")
                                 else ("miccai2012", ".nii.gz"))
            scan = data.load_scan(self.path(folder, "images", name + extension))
            labels = data.load_label_map(self.path(folder, "labels", name + extension)).data
            entry = {}
            for contrast in CONTRASTS:
                values = scan.data if contrast == "t1" else remap_contrast(
                    scan.data, labels, contrast, seed=len(found))
                volume = data.Volume(np.asarray(values, np.float32), scan.affine,
                                     f"{name}_{contrast}", header=scan.header)
                result = self.predictor.segment(volume)
                entry[contrast] = {"dice": mean_dice(result["segmentation"], labels),
                                   "diagnosis": result["alignment"].diagnosis,
                                   "similarity": result.get("similarity", "ncc")}
            found[name] = entry
            print(name, entry, flush=True)
        return found


def summarise(results: dict) -> dict:
    summary, heads = {}, results.get("heads")
    mean = lambda values, digits=4: round(float(np.mean(list(values))), digits)  # noqa: E731
    if heads:
        figures = [h["head"] for h in heads.values()]
        summary["brain_mask"] = {
            "mean_dice": mean(f["dice"] for f in figures),
            "min_dice": round(float(np.min([f["dice"] for f in figures])), 4),
            "max_brain_left_out_pct": round(float(np.max([f["brain_left_out_pct"]
                                                          for f in figures])), 3),
            "max_extraction_seconds": round(float(np.max([f["extraction_seconds"]
                                                          for f in figures])), 2),
            "mean_cpu_seconds": mean((f["cpu_seconds"] for f in figures), 2)}
        for variant, _ in VARIANTS:
            summary[f"from_head_{variant}"] = {
                "mean_head": mean(h["head"][variant] for h in heads.values()),
                "mean_native": mean(h["native_dice"] for h in heads.values()),
                "mean_difference": mean(h["head"][variant] - h["native_dice"]
                                        for h in heads.values())}
            if all("biased" in h for h in heads.values()):
                differences = [h["biased"][variant] - h["head"]["dice_n4"] for h in heads.values()]
                summary[f"bias_{variant}"] = {"mean_difference": mean(differences),
                                              "largest_drop": round(float(np.min(differences)), 4)}
    if results.get("contrast"):
        summary["contrast"] = {c: mean(s[c]["dice"] for s in results["contrast"].values())
                               for c in CONTRASTS}
    return summary


def main(argv):
    del argv
    bench = Bench(FLAGS.data_dir)
    run, measured = {"command": harness.command_line(), "commit": harness.git_commit(),
                     "load_average_1min": {"start": os.getloadavg()[0]}}, {}
    if "brain_mask" in FLAGS.sections or "bias" in FLAGS.sections:
        measured["heads"] = bench.heads(with_bias="bias" in FLAGS.sections)
    if "contrast" in FLAGS.sections:
        measured["contrast"] = bench.contrasts()
    # A run of some sections keeps the others' results from an earlier run, each with its own
    # command and commit (``runs``).
    path = os.path.join(FLAGS.results_dir, "heads.json")
    results = harness.read_json(path, merge=len(FLAGS.sections) < 3)
    run["load_average_1min"]["end"] = os.getloadavg()[0]
    results.update(targets=TARGETS, command=run["command"], commit=run["commit"], **measured)
    results.setdefault("runs", {}).update({part: run for part in measured})
    results["summary"] = summarise(results)
    harness.write_results(results, markdown, path[:-len(".json")])
    print(results["summary"])


# ------------------------------------------------------------------------------- heads.md
def _load(run: dict) -> str:
    load = run.get("load_average_1min")
    return (f" (load {load['start']:.1f} -> {load['end']:.1f})" if load
            else " (load 9-16: a shared machine)")


def _summary(summary: dict, targets: dict) -> list:
    lines = []
    if "brain_mask" in summary:
        mask = summary["brain_mask"]
        lines.append(
            f"- brain_mask: mean Dice {mask['mean_dice']:.4f} (target >= "
            f"{targets['brain_mask_mean_dice']}), min {mask['min_dice']:.4f} (>= "
            f"{targets['brain_mask_min_dice']}), labelled brain left out at most "
            f"{mask['max_brain_left_out_pct']:.2f} % (<= {targets['brain_left_out_pct']} %), "
            f"extraction at most {mask['max_extraction_seconds']:.1f} s wall per head, "
            f"preparation {mask['mean_cpu_seconds']:.1f} CPU s per head on average "
            f"(target <= {targets['seconds_per_head']} s)")
        lines += [f"- from_head ({label}): mean Dice {e['mean_head']:.4f} from the heads, "
                  f"{e['mean_native']:.4f} from FreeSurfer's stripped scans: difference "
                  f"{e['mean_difference']:+.4f} (target >= {targets['from_head_difference']})"
                  for variant, label in VARIANTS for e in [summary[f"from_head_{variant}"]]]
        lines += [f"- bias (+-25 %, {label}): mean Dice difference {e['mean_difference']:+.4f} "
                  f"against the head without the field (with N4), largest drop "
                  f"{e['largest_drop']:+.4f} (target within {targets['bias_difference']})"
                  for variant, label in VARIANTS for e in [summary.get(f"bias_{variant}")] if e]
    if "contrast" in summary:
        e = summary["contrast"]
        lines.append(f"- contrast: mean Dice T1 {e['t1']:.4f}, T2-like {e['t2']:.4f}, "
                     f"FLAIR-like {e['flair']:.4f}, PD-like {e['pd']:.4f} (target "
                     f"within {targets['contrast_difference']} of T1)")
    return lines


def markdown(results: dict) -> list:
    summary = results["summary"]
    runs = results.get("runs") or {"all": {"command": results["command"],
                                            "commit": results["commit"]}}
    made = "; ".join(f"{part}: `{run['command']}` at commit `{run['commit']}`" + _load(run)
                     for part, run in runs.items())
    lines = ["# Whole heads, bias fields, other contrasts", "",
             f"{made}; on a 2-core CPU (where the load was above 2, other jobs shared the cores: "
             "wall seconds are upper bounds there; CPU seconds are the process's own). Segmenting "
             "without a trained network "
             "(the atlas of ../shared/data, refinement at its defaults), Dice of the 28 benchmark "
             "structures on each scan's own grid. See `bench/heads.py` for every step and "
             "`bench/contrasts.py` for how bias fields and contrasts are made.", ""]
    if "brain_mask" in summary:
        lines += ["## Summary", ""]
    lines += _summary(summary, results["targets"])
    if results.get("heads"):
        f4 = lambda v: f"{v:.4f}"  # noqa: E731
        lines += ["", "## Per head", "", *table(
            ["head", "mask Dice", "brain left out", "mask L", "extraction s", "N4 s",
             "all CPU s", "Dice from head (N4)", "(no N4)", "from native", "with bias (N4)",
             "(no N4)"],
            [[name, f4(h["dice"]), f"{h['brain_left_out_pct']:.2f} %",
              f"{h['mask']['volume_l']:.2f}", f"{h['extraction_seconds']:.1f}",
              f"{h['n4_seconds']:.1f}", f"{h['cpu_seconds']:.1f}", f4(h["dice_n4"]),
              f4(h["dice_no_n4"]), f4(e["native_dice"]),
              *((f4(e["biased"]["dice_n4"]), f4(e["biased"]["dice_no_n4"])) if e.get("biased")
                else ("-", "-"))]
             for name, e in results["heads"].items() for h in [e["head"]]])]
    if results.get("contrast"):
        lines += ["", "## Per scan and contrast", "", *table(
            ["scan", "T1", "T2-like", "FLAIR-like", "PD-like", "similarity (T2/FLAIR/PD)"],
            [[name, *(f"{e[c]['dice']:.4f}" for c in CONTRASTS),
              "/".join(str(e[c]["similarity"]) for c in CONTRASTS[1:])]
             for name, e in results["contrast"].items()])]
    return lines


if __name__ == "__main__":
    app.run(main)
