"""T2-, FLAIR- and PD-like scans with a T1 atlas, through the prediction pipeline.

    python -m bench.contrasts            # all sections, ~1.5-3 h on 2 shared CPU cores

Scans: sub-06/07 (``native/``, FreeSurfer's conformed grids) and the six MICCAI 2012 validation
scans (their own grids), each as it is (T1) and remapped to T2-, FLAIR- and PD-like contrasts of
two kinds, reported separately (``bench.synthetic_contrasts`` says exactly how each is made):
``intensities`` (from the T1's intensities alone, no labels) and ``labels`` (from the label map,
with the scan's own texture). Both with a +-20 % bias field and Rician noise. Each scan is
segmented on its own grid as ``predict.py --atlas`` does (alignment included), Dice of the 28
benchmark structures.

Sections (``--sections``):

- ``segmentation``: one atlas (the data's), the product's configuration (``--similarity auto``,
  plus ``--predictor_options``) and, with ``--compare``, the product without the per-scan
  intensity model (``intensity_off``) or each similarity forced (``ncc``, ``remap``, ``mind``;
  ``ngf``: normalised gradient fields in the refinement). Per scan: Dice, wall
  and CPU seconds (read to labels, the scan in memory), the similarity used, the contrast named,
  the diagnosis line the product prints.
- ``fusion``: five atlases (the data's and sub-01..04), joint label fusion, the product's
  configuration; with ``--compare``, the weights of other contrasts from the scan as it is
  (``jlf_raw``) and majority voting.
- ``alignment``: is the affine alignment (Mattes MI) what loses other contrasts? Each remapped scan
  segmented with its T1's alignment instead of its own, and the two affines' mean distance over
  the brain (mm).
- ``diagnosis``: the alignment's figures and diagnosis of every native scan of the data (native/ and
  miccai2012/: 25) in the four contrasts and two kinds, and of broken inputs made from four of them
  (header upside down, two voxel axes swapped, in each contrast; a noise volume and brain-shaped
  noise): other contrasts must read 'contrast', broken ones 'orientation'.

``--predictor_options '{"name": value}'`` passes keyword arguments to the product's ``Predictor``
(settings of the pipeline added later go through without changing this file). Timings are upper
bounds where other jobs shared the cores (the load average is recorded). Writes
bench/results/contrasts.json and .md.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import json
import os
import time
import zlib

import numpy as np
from absl import app, flags

from bench import harness, synthetic_contrasts as recipes
from bench.contrast_cases import broken_inputs, load_case
from bench.contrasts_report import markdown, summarise

CONTRASTS = ("t1", "t2", "flair", "pd")
CONFIGS = ("product",)
COMPARE = ("intensity_off", "ncc", "remap", "mind", "ngf")
FUSION_COMPARE = ("jlf_raw", "majority")
SECTIONS = ("diagnosis", "segmentation", "fusion", "alignment")
BROKEN_FROM = ("sub-06", "sub-07", "1000", "1001")
TARGETS = {"t2": 0.03, "flair": 0.03, "pd": 0.05, "seconds_ratio": 2.0}
harness.define_flags("contrasts", work=False)
flags.DEFINE_list("sections", list(SECTIONS), "What to measure.")
flags.DEFINE_list("kinds", list(recipes.KINDS), "Kinds of contrast: intensities, labels.")
flags.DEFINE_list("scans", list(harness.SHARED_SUBJECTS + harness.MICCAI_SUBJECTS),
                  "Scans to segment (native sub-XX or MICCAI numbers).")
flags.DEFINE_list("compare", [], f"Also segment with each of {', '.join(COMPARE)} forced, and "
                  f"fuse with {', '.join(FUSION_COMPARE)}.")
flags.DEFINE_string("predictor_options", "{}", "JSON object of further Predictor keyword "
                    "arguments for the product's configuration.")
flags.DEFINE_list("extra_atlases", ["sub-01", "sub-02", "sub-03", "sub-04"],
                  "Further atlases of the fusion section.")
FLAGS = flags.FLAGS


def seed(*parts) -> int:
    return zlib.crc32("-".join(map(str, parts)).encode())


def variants(name: str, kinds) -> dict:
    """{(kind, contrast): volume} of a scan: ('t1', 't1') as it is, then each kind's three."""
    from ltnet_tf.io import volumes

    scan, labels = load_case(FLAGS.data_dir, name)
    found = {("t1", "t1"): scan}
    for kind in kinds:
        for contrast in recipes.CONTRASTS:
            values = recipes.make_contrast(scan.data, labels.data, contrast, kind,
                                           seed(name, contrast, kind))
            found[(kind, contrast)] = volumes.Volume(values, scan.affine, f"{name}_{contrast}",
                                                     header=scan.header)
    return found, labels


class Segmenter:
    """A ``Predictor`` of one configuration, timed per scan (wall and the process's CPU); its
    first scan (tracing, the atlases' MIND-SSC descriptors) is paid at construction, on the atlas
    and on the atlas inverted (another contrast)."""

    def __init__(self, atlases, similarity="auto", refinement=None, fusion="jlf",
                 predictor_class=None, **options):
        from ltnet_tf.config import RefinementSettings
        from ltnet_tf.io import volumes
        from ltnet_tf.prediction.predictor import Predictor

        self.predictor = (predictor_class or Predictor)(
            atlases, None, refinement=refinement or RefinementSettings(), similarity=similarity,
            fusion_method=fusion, **options)
        atlas = atlases.primary.image
        inverted = np.where(atlas.data > 0, atlas.data.max() * 1.05 - atlas.data, 0)
        for image in (atlas, volumes.Volume(inverted.astype(np.float32), atlas.affine, "t2")):
            self.predictor.segment(image)

    def __call__(self, volume, labels) -> dict:
        from ltnet_tf.io import evaluation
        from ltnet_tf.io.labels import BENCHMARK_LABELS
        from ltnet_tf.reporting.report import alignment_verdict

        start, cpu = time.time(), _cpu()
        result = self.predictor.segment(volume)
        seconds, cpu_seconds = time.time() - start, _cpu() - cpu
        dice = evaluation.dice_per_label(result["segmentation"], labels.data, BENCHMARK_LABELS)
        found = result["alignment"]
        record = {"alignment": found.to_dict(), "alignment_ok": found.ok,
                  "similarity": result["similarity"]}
        return {"dice": round(float(evaluation.mean_dice(dice, BENCHMARK_LABELS)), 4),
                "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                "similarity": result["similarity"], "diagnosis": found.diagnosis,
                "contrast": found.contrast, "line": alignment_verdict(record),
                "stages": {k: round(v, 2) for k, v in result["seconds"].items()}}


def raw_scan_fusion():
    """A Predictor whose fusion weights compare the warped atlases with the scan as it is (not
    mapped to the atlas's contrast): what joint label fusion's intensity weights do to a T2 scan."""
    from ltnet_tf.io import volumes
    from ltnet_tf.prediction.predictor import Predictor
    from ltnet_tf.registration.refinement_terms import to_grid

    class RawScanFusion(Predictor):
        def _align(self, scan, prepared, clock):
            found = super()._align(scan, prepared, clock)
            self._raw_scan = found[1]
            return found

        def _fusion_weights(self, refined, similarity="ncc"):
            import tensorflow as tf
            raw = volumes.normalize_intensity(tf.constant(
                np.asarray(self._raw_scan.data, np.float32)[None, ..., None]))
            raw = to_grid(raw, self.refiner.refinement.factor)[0].numpy()
            return super()._fusion_weights({**refined, "scan": raw}, similarity)

    return RawScanFusion


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def segment_all(configs: dict, kinds, scans, found: dict, save) -> None:
    """Every configuration on every scan variant; ``found`` {config: {scan: {'t1' | kind:
    {contrast: figures}}}}; ``save()`` after every scan."""
    for name in scans:
        cases, labels = variants(name, kinds)
        for config, segmenter in configs.items():
            entry = found.setdefault(config, {}).setdefault(name, {})
            for (kind, contrast), volume in cases.items():
                figures = segmenter(volume, labels)
                (entry.setdefault(kind, {}) if kind != "t1" else entry)[contrast] = figures
                print(f"[{config}] {name} {kind} {contrast}: Dice {figures['dice']:.4f}, "
                      f"{figures['seconds']:.1f} s, {figures['similarity']}, "
                      f"{figures['line']}", flush=True)
        save()


def alignment_section(atlases, kinds, scans, save) -> dict:
    """Each remapped scan aligned by the product and by its T1's alignment, both resampled onto
    the atlas grid with their label maps (nearest label) and segmented there (product
    configuration): Dice on the atlas grid, and the two affines' mean distance over the brain."""
    from ltnet_tf.io import volumes

    segmenter, found = Segmenter(atlases, **json.loads(FLAGS.predictor_options)), {}
    aligner = segmenter.predictor.aligner

    def on_atlas_grid(volume, labels, alignment):
        moved = alignment.resample_scan(volume)
        return segmenter(volumes.Volume(moved.data, moved.affine, volume.path),
                         alignment.resample_labels(labels))

    for name in scans:
        cases, labels = variants(name, kinds)
        t1 = aligner.align(cases[("t1", "t1")])
        for (kind, contrast), volume in cases.items():
            if kind == "t1":
                continue
            own = aligner.align(volume)
            found.setdefault(kind, {}).setdefault(name, {})[contrast] = {
                "dice_own_alignment": on_atlas_grid(volume, labels, own)["dice"],
                "dice_t1_alignment": on_atlas_grid(volume, labels, t1)["dice"],
                "affine_distance_mm": round(affine_distance_mm(own, t1, labels.data > 0), 3)}
            print(name, kind, contrast, found[kind][name][contrast], flush=True)
        save(found)
    return found


def diagnosis_section(save) -> dict:
    """Alignment figures of every native scan in every contrast and kind, and of broken inputs."""
    from ltnet_tf.io import volumes
    from ltnet_tf.registration import alignment

    aligner = alignment.AtlasAligner(volumes.load_scan(os.path.join(FLAGS.data_dir,
                                                                    "atlas.nii.gz")))
    names = ([f"sub-0{i}" for i in range(1, 8)] + sorted(
        volumes.scan_name(p) for p in os.listdir(os.path.join(FLAGS.data_dir, "miccai2012",
                                                              "images"))))
    found = {"correct": {}, "broken": {}}

    def figures(volume) -> dict:
        clock = time.time()
        result = aligner.align(volume, force=True, check_size=False)
        entry = {key: result.to_dict()[key] for key in (
            "brain_overlap", "correlation", "correlation_ratio", "local_correlation",
            "contrast", "diagnosis")}
        entry["seconds"] = round(time.time() - clock, 2)
        return entry

    for name in names:
        cases, _ = variants(name, recipes.KINDS)
        found["correct"][name] = {f"{kind}/{contrast}": figures(volume)
                                  for (kind, contrast), volume in cases.items()}
        if name in BROKEN_FROM:
            for broken, volume in broken_inputs(cases[("t1", "t1")]).items():
                for contrast in CONTRASTS if "noise" not in broken else ("t1",):
                    moved = volume if contrast == "t1" else volumes.Volume(
                        recipes.make_contrast(volume.data, None, contrast, "intensities",
                                              seed(name, broken, contrast)), volume.affine,
                        volume.path)
                    found["broken"].setdefault(name, {})[f"{broken}/{contrast}"] = figures(moved)
        print(name, json.dumps(found["correct"][name]), flush=True)
        save(found)
    return found


def main(argv):
    del argv
    from ltnet_tf.registration.atlases import AtlasSet

    path = os.path.join(FLAGS.results_dir, "contrasts.json")
    results = harness.read_json(path)
    run = {**harness.provenance(), "machine": harness.machine()}
    sections = {s: run for s in FLAGS.sections}
    results.setdefault("runs", {}).update(sections)
    results.update(targets=TARGETS, recipes=recipes.__doc__,
                   predictor_options=json.loads(FLAGS.predictor_options))

    def save(section=None, found=None):
        if section:
            results[section] = found
        run["load_average_1_5_15min"]["end"] = os.getloadavg()
        results["summary"] = summarise(results)
        results["mean_dice"] = results["summary"].get("mean_dice")
        harness.write_results(results, markdown, path[:-len(".json")])

    if "diagnosis" in FLAGS.sections:
        diagnosis_section(lambda found: save("diagnosis", found))
    pairs = harness.atlas_pairs(FLAGS.data_dir, FLAGS.extra_atlases)
    one = AtlasSet.load([pairs[0][0]], [pairs[0][1]])
    options = json.loads(FLAGS.predictor_options)
    if "segmentation" in FLAGS.sections:
        from ltnet_tf.config import RefinementSettings
        configs = {"product": Segmenter(one, **options)}
        for name in FLAGS.compare:
            if name == "intensity_off":  # the product without the per-scan intensity model
                configs[name] = Segmenter(one, **{**options, "intensity_model": "off"})
            elif name in COMPARE:
                configs[name] = (Segmenter(one, "ncc", RefinementSettings(similarity="ngf"))
                                 if name == "ngf" else Segmenter(one, name))
        found = results.setdefault("segmentation", {})
        segment_all(configs, FLAGS.kinds, FLAGS.scans, found,
                    lambda: save("segmentation", found))
    if "fusion" in FLAGS.sections:
        five = AtlasSet.load([p for p, _ in pairs], [q for _, q in pairs])
        configs = {"product": Segmenter(five, **options)}
        if "majority" in FLAGS.compare:
            configs["majority"] = Segmenter(five, fusion="majority", **options)
        if "jlf_raw" in FLAGS.compare:
            configs["jlf_raw"] = Segmenter(five, predictor_class=raw_scan_fusion(), **options)
        found = results.setdefault("fusion", {})
        segment_all(configs, FLAGS.kinds, FLAGS.scans, found, lambda: save("fusion", found))
    if "alignment" in FLAGS.sections:
        alignment_section(one, FLAGS.kinds, FLAGS.scans,
                          lambda found: save("alignment", found))
    save()


def affine_distance_mm(first, second, mask: np.ndarray) -> float:
    """Mean distance (mm) between where two alignments of the same scan grid put the voxels of
    ``mask`` (on that grid) in the atlas's world."""
    voxels = np.argwhere(mask)[::97].astype(float)
    points = np.c_[voxels, np.ones(len(voxels))].T
    world = [np.linalg.inv(a.atlas_to_scan_world) @ a.scan_affine @ points for a in (first, second)]
    return float(np.linalg.norm((world[0] - world[1])[:3], axis=0).mean())


if __name__ == "__main__":
    app.run(main)
