"""Brain extraction candidates side by side on the six whole heads of ../shared/data/heads.

    python -m bench.brain_extractors --candidates deepbet,atlas        # the product's environment
    python -m bench.brain_extractors --candidates bet                  # where brainextractor is

Candidates:
  deepbet  deepbet 1.0.2 (MIT; TorchScript weights inside its wheel), on the CPU, threshold 0.5
  bet      brainextractor 0.3.0 (FSL BET's deformable surface in Python), its defaults
  atlas    the product's own method: the brain mask of another head (leave one out: never a head
           as its own atlas; the next subject in the list) carried over by the product's
           alignment (rigid + affine, Mattes MI) and test-time refinement (from the identity,
           25 + 10 steps), as antsBrainExtraction.sh does with its template. Benchmark only: the
           heads have no licence, and no registry package ships a whole-head template with a
           brain mask (nilearn ships MNI ICBM152 2009 skull-stripped only)

Per head: Dice of the mask against FreeSurfer's (brainmask.mgz > 0), the share of labelled brain
(aseg > 0) outside the mask, the mask's volume, seconds (the model or atlas loaded once, outside).
Results are merged into bench/results/brain_extractors.json (one entry per candidate) and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import nibabel as nib
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("LTNET_DATA_DIR") or os.path.normpath(
    os.path.join(ROOT, "..", "shared", "data"))
HEADS = ("sub-01", "sub-02", "sub-04", "sub-05", "sub-06", "sub-07")


def head_files(name: str, data_dir: str = DATA_DIR) -> dict:
    folder = os.path.join(data_dir, "heads")
    return {kind: os.path.join(folder, kind, f"{name}.nii.gz")
            for kind in ("images", "labels", "masks")}


def mask_figures(mask: np.ndarray, reference: np.ndarray, labels: np.ndarray,
                 voxel_ml: float) -> dict:
    """Dice against the reference mask, the share of labelled brain left outside, volume in L."""
    mask, reference, brain = mask > 0, reference > 0, labels > 0
    dice = 2.0 * np.logical_and(mask, reference).sum() / (mask.sum() + reference.sum())
    return {"dice": round(float(dice), 4),
            "brain_left_out_pct": round(100.0 * float((brain & ~mask).sum()) / brain.sum(), 3),
            "volume_l": round(float(mask.sum()) * voxel_ml / 1000.0, 3)}


def deepbet_candidate():
    from deepbet import BrainExtraction

    extractor = BrainExtraction(no_gpu=True)

    def extract(name):
        image = nib.load(head_files(name)["images"])
        _, mask, _ = extractor.run(image)
        return np.asarray(mask.dataobj) > 0
    return extract


def bet_candidate():
    from brainextractor import BrainExtractor

    def extract(name):
        image = nib.load(head_files(name)["images"])
        extractor = BrainExtractor(img=image)
        extractor.run()
        return np.asarray(extractor.compute_mask()) > 0
    return extract


def atlas_candidate():
    sys.path.insert(0, ROOT)
    from ltnet_tf.config import RefinementSettings
    from ltnet_tf.io import volumes as data
    from ltnet_tf.registration import alignment as alignment_lib
    from ltnet_tf.registration.native import NativeLabelPull
    from ltnet_tf.registration.refinement import ScanRefiner

    settings = alignment_lib.AlignmentSettings(max_tissue_ml=1e9)
    atlases = {}

    def atlas_for(name):
        other = HEADS[(HEADS.index(name) + 1) % len(HEADS)]
        if other not in atlases:
            files = head_files(other)
            image = data.load_scan(files["images"])
            atlases[other] = (alignment_lib.AtlasAligner(image, settings),
                              ScanRefiner(None, image.data, RefinementSettings()),
                              NativeLabelPull(data.load_label_map(files["masks"]).data))
        return atlases[other]

    def extract(name):
        aligner, refiner, pull = atlas_for(name)
        scan = data.load_scan(head_files(name)["images"])
        start = time.time()
        alignment = aligner.align(scan, force=True)
        displacement, _ = refiner(alignment.resample_scan(scan))
        mask = pull(displacement.element(0), alignment.scan_voxel_to_atlas_voxel, scan.shape,
                    grid_shape=aligner.atlas.shape)
        extract.seconds = time.time() - start
        return mask > 0
    return extract


def sweep(shapes=(256, 192), thresholds=(0.5, 0.3, 0.1), dilations=(0, 1, 2)) -> dict:
    """deepbet's probability per head at each model shape, then the mask's figures for each
    threshold and dilation (voxels, 6-connected steps) -- to choose the product's settings."""
    sys.path.insert(0, ROOT)
    from scipy import ndimage

    from ltnet_tf.io import volumes as data
    from ltnet_tf.preprocessing.brain_extraction import (BrainExtractionSettings,
                                                         DeepBetExtractor)

    found = {}
    for shape in shapes:
        extractor = DeepBetExtractor(BrainExtractionSettings(model_shape=shape))
        for name in HEADS:
            files = head_files(name)
            scan = data.load_scan(files["images"])
            start, cpu = time.time(), sum(os.times()[:2])
            probability = extractor.probability(scan)
            seconds, cpu = time.time() - start, sum(os.times()[:2]) - cpu
            reference = np.asarray(nib.load(files["masks"]).dataobj)
            labels = np.asarray(nib.load(files["labels"]).dataobj)
            for threshold in thresholds:
                mask = DeepBetExtractor._largest_filled(probability > threshold)
                for dilation in dilations:
                    grown = ndimage.binary_dilation(mask, iterations=dilation) if dilation else mask
                    key = f"shape{shape}_t{threshold}_d{dilation}"
                    found.setdefault(key, {})[name] = {
                        **mask_figures(grown, reference, labels, 1.0), "seconds": round(seconds, 2),
                        "cpu_seconds": round(cpu, 2)}
            print(shape, name, found[f"shape{shape}_t0.5_d0"][name], flush=True)
    return {key: {"heads": heads,
                  "mean_dice": round(float(np.mean([h["dice"] for h in heads.values()])), 4),
                  "min_dice": round(float(np.min([h["dice"] for h in heads.values()])), 4),
                  "max_brain_left_out_pct": round(float(np.max(
                      [h["brain_left_out_pct"] for h in heads.values()])), 3),
                  "mean_seconds": round(float(np.mean([h["seconds"] for h in heads.values()])), 2),
                  "mean_cpu_seconds": round(float(np.mean(
                      [h["cpu_seconds"] for h in heads.values()])), 2)}
            for key, heads in found.items()}


CANDIDATES = {"deepbet": deepbet_candidate, "bet": bet_candidate, "atlas": atlas_candidate}


def measure(candidate: str) -> dict:
    start = time.time()
    extract = CANDIDATES[candidate]()
    setup = time.time() - start
    heads = {}
    for name in HEADS:
        files = head_files(name)
        reference_image = nib.load(files["masks"])
        voxel_ml = abs(float(np.linalg.det(reference_image.affine[:3, :3]))) / 1000.0
        start = time.time()
        mask = extract(name)
        seconds = getattr(extract, "seconds", None) or time.time() - start
        figures = mask_figures(mask, np.asarray(reference_image.dataobj),
                               np.asarray(nib.load(files["labels"]).dataobj), voxel_ml)
        heads[name] = {**figures, "seconds": round(seconds, 2)}
        print(candidate, name, heads[name], flush=True)
    values = lambda key: [h[key] for h in heads.values()]  # noqa: E731
    return {"setup_seconds": round(setup, 2), "heads": heads,
            "mean_dice": round(float(np.mean(values("dice"))), 4),
            "min_dice": round(float(np.min(values("dice"))), 4),
            "max_brain_left_out_pct": round(float(np.max(values("brain_left_out_pct"))), 3),
            "mean_seconds": round(float(np.mean(values("seconds"))), 2),
            "command": "python -m bench.brain_extractors " + " ".join(sys.argv[1:])}


def write_markdown(results: dict, path: str) -> None:
    lines = ["# Brain extraction candidates on six whole heads", "",
             "Written by `python -m bench.brain_extractors` (see its docstring). Dice against "
             "FreeSurfer's brain mask (brainmask.mgz > 0, generous: it keeps some CSF and dura); "
             "left out: labelled brain (aseg > 0) outside the mask. Seconds per head on a shared "
             "2-core CPU (upper bounds), the model or atlas loaded once outside them.", "",
             "| candidate | mean Dice | min Dice | max brain left out | mean s/head | set-up s |",
             "|---|---|---|---|---|---|"]
    for name, result in results.items():
        lines.append(f"| {name} | {result['mean_dice']:.3f} | {result['min_dice']:.3f} | "
                     f"{result['max_brain_left_out_pct']:.2f} % | {result['mean_seconds']:.1f} | "
                     f"{result['setup_seconds']:.1f} |")
    lines += ["", "Per head (Dice / left out % / volume L / s):", "",
              "| candidate | " + " | ".join(HEADS) + " |", "|---|" + "---|" * len(HEADS)]
    for name, result in results.items():
        cells = [f"{h['dice']:.3f} / {h['brain_left_out_pct']:.2f} / {h['volume_l']:.2f} / "
                 f"{h['seconds']:.1f}" for h in (result["heads"][n] for n in HEADS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", default="deepbet,atlas")
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--sweep", action="store_true", help="deepbet's settings swept instead")
    args = parser.parse_args(argv)
    if args.sweep:
        path = os.path.join(args.results_dir, "brain_extractors_deepbet_sweep.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"command": "python -m bench.brain_extractors --sweep", **sweep()}, f,
                      indent=2)
        os.replace(path + ".tmp", path)
        return
    path = os.path.join(args.results_dir, "brain_extractors.json")
    for candidate in args.candidates.split(","):
        result = measure(candidate)
        results = json.load(open(path)) if os.path.exists(path) else {}
        results[candidate] = result
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=2)
        os.replace(path + ".tmp", path)
        write_markdown(results, os.path.join(args.results_dir, "brain_extractors.md"))


if __name__ == "__main__":
    main()
