"""Can a learned corrector improve on the product's best answer? A probe, before any product code.

A corrector (corrective learning: Wang et al., NeuroImage 2011) sees the scan and the product's
per-structure posterior (label transfer, fusion and the intensity model) and learns where that
answer is systematically wrong. Built here as a residual: logits = log(posterior) + Δ, Δ from a
small 3D U-Net on the half-resolution grid whose last layer starts at zero, so the untrained
corrector gives the product's labels exactly; Δ is upsampled and added on the scan's grid.

What it is trained on (never a validation subject in any form):

    reverse     one atlas: sub-01..05 as unlabelled scans, labelled by the product (pseudo-atlases),
                each transferred back onto the real atlas, whose true labels are known: the
                errors of a real transfer (registration, the intensity model), exact truth
    deformed    one atlas: the atlas's labels deformed by random smooth fields (the size of error
                a registration leaves) and finished by the intensity model on the atlas image
    both        reverse + deformed
    loo         five atlases (the data's atlas and sub-01..04): each segmented by the other four,
                as the product fuses them: real fusion errors, manual truth

and scored on sub-06/07 and the six MICCAI 2012 validation subjects against the product's default
with one atlas (best_1) and five (best_5). Seconds per scan: the product's, plus the corrector's
forward pass and its upsampling on the scan's grid.

    python -m bench.corrector_probe                 # about 40 min on a quiet 2-core machine

Writes bench/results/corrector.json and corrector.md.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import os
import time

import numpy as np
from absl import app, flags

from bench import harness
from bench.harness import table
from ltnet_tf.config import RefinementSettings

FLAGS = flags.FLAGS
harness.define_flags("corrector")
flags.DEFINE_integer("steps", 400, "Training steps per corrector.")
flags.DEFINE_integer("deformed", 6, "Examples of the 'deformed' source.")
flags.DEFINE_float("deformation_voxels", 2.0, "RMS displacement of the 'deformed' source's fields.")
flags.DEFINE_integer("seed", 0, "Seed of the fields, the patches and the initial weights.")
flags.DEFINE_list("sources", ["reverse", "deformed", "both", "loo"], "Correctors to train.")
UNLABELLED = ("sub-01", "sub-02", "sub-03", "sub-04", "sub-05")
SET_KEYS = {"shared": "fstd", "miccai2012": "miccai"}
PATCH = (48, 48, 48)


def half(x: np.ndarray) -> np.ndarray:
    """[..., D, H, W] averaged over 2×2×2 blocks (the grid cropped to even sizes)."""
    d, h, w = (s // 2 * 2 for s in x.shape[-3:])
    x = x[..., :d, :h, :w]
    return x.reshape(*x.shape[:-3], d // 2, 2, h // 2, 2, w // 2, 2).mean(axis=(-5, -3, -1))


class Example:
    """A scan, the product's posterior on it ([L, D, H, W] uint8 ×255) and the truth, kept at half
    resolution for training (inputs float16, truth by taking every second voxel)."""

    def __init__(self, scan: np.ndarray, posterior: np.ndarray, truth, ids):
        from ltnet_tf.io.intensity import normalize_array

        self.inputs = np.concatenate([half(normalize_array(scan))[None],
                                      half(np.log(posterior / 255.0 + 1e-3))]).astype(np.float16)
        self.truth = None if truth is None else np.searchsorted(ids, truth[::2, ::2, ::2][
            :self.inputs.shape[1], :self.inputs.shape[2], :self.inputs.shape[3]]).astype(np.int32)
        self.brain = self.inputs[0] > 0

    @classmethod
    def from_arrays(cls, inputs: np.ndarray, truth: np.ndarray) -> "Example":
        example = cls.__new__(cls)
        example.inputs, example.truth, example.brain = inputs, truth, inputs[0] > 0
        return example


def build_corrector(channels: int, labels: int):
    """[B, d, h, w, 1 + L] (scan, log posterior) -> Δ [B, d, h, w, L], the last layer zero."""
    import tensorflow as tf

    KL = tf.keras.layers
    inputs = KL.Input((None, None, None, channels))
    x0 = KL.LeakyReLU(0.2)(KL.Conv3D(24, 3, padding="same")(inputs))
    x1 = KL.AveragePooling3D(2)(x0)
    x1 = KL.LeakyReLU(0.2)(KL.Conv3D(32, 3, padding="same")(x1))
    x2 = KL.AveragePooling3D(2)(x1)
    x2 = KL.LeakyReLU(0.2)(KL.Conv3D(32, 3, padding="same")(x2))
    y1 = KL.Concatenate()([KL.UpSampling3D(2)(x2), x1])
    y1 = KL.LeakyReLU(0.2)(KL.Conv3D(32, 3, padding="same")(y1))
    y0 = KL.Concatenate()([KL.UpSampling3D(2)(y1), x0])
    y0 = KL.LeakyReLU(0.2)(KL.Conv3D(24, 3, padding="same")(y0))
    delta = KL.Conv3D(labels, 1, kernel_initializer="zeros", bias_initializer="zeros")(y0)
    return tf.keras.Model(inputs, delta)


def train(examples: list, labels: int, steps: int, seed: int):
    """The corrector fitted by Adam on random patches (cross-entropy of log posterior + Δ against
    the truth, brain voxels only), the scan's intensities scaled and gamma-augmented."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_corrector(examples[0].inputs.shape[0], labels)
    optimizer = tf.keras.optimizers.Adam(1e-3)

    @tf.function
    def step(x, y, m):
        with tf.GradientTape() as tape:
            logits = x[..., 1:] + model(x)
            loss = tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits)
            loss = tf.reduce_sum(loss * m) / tf.maximum(tf.reduce_sum(m), 1.0)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))
        return loss

    start, losses = time.time(), []
    for number in range(steps):
        e = examples[rng.integers(len(examples))]
        shape = e.inputs.shape[1:]
        centre = np.argwhere(e.brain)[rng.integers(e.brain.sum())]
        low = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, PATCH, shape)]
        box = tuple(slice(a, a + p) for a, p in zip(low, PATCH))
        x = e.inputs[(slice(None), *box)].astype(np.float32)
        scan = x[0]
        x[0] = np.where(scan > 0, np.clip(scan, 0, None) ** rng.uniform(0.8, 1.25)
                        * rng.uniform(0.9, 1.1), 0)
        losses.append(float(step(np.moveaxis(x, 0, -1)[None], e.truth[box][None],
                                 e.brain[box][None].astype(np.float32))))
        if (number + 1) % 100 == 0:
            print(f"  step {number + 1}/{steps}: loss {np.mean(losses[-100:]):.4f}", flush=True)
    return model, {"minutes": (time.time() - start) / 60, "loss_first_100": float(np.mean(
        losses[:100])), "loss_last_100": float(np.mean(losses[-100:]))}


def correct(model, example: Example, posterior: np.ndarray, labels: np.ndarray, ids,
            brain: np.ndarray) -> tuple:
    """(labels on the scan's grid, seconds): argmax of log posterior + Δ (Δ repeated over each
    2×2×2 block), the product's label winning ties; outside ``brain`` the product's labels."""
    start = time.time()
    delta = model(np.moveaxis(example.inputs.astype(np.float32), 0, -1)[None])[0].numpy()
    own = np.searchsorted(ids, labels)
    best = np.full(labels.shape, -np.inf, np.float32)
    choice = own.copy()
    d, h, w = delta.shape[:3]
    for index in range(len(ids)):
        score = np.log(posterior[index] / 255.0 + 1e-3).astype(np.float32)
        score[:2 * d, :2 * h, :2 * w] += np.repeat(np.repeat(np.repeat(
            delta[..., index], 2, 0), 2, 1), 2, 2)
        score += 1e-3 * (own == index)
        better = score > best
        best[better], choice[better] = score[better], index
    return np.where(brain, ids[choice], labels).astype(labels.dtype), time.time() - start


def segment(product, scan, ids) -> tuple:
    """(labels, posterior [L, *grid] uint8, seconds) of the product on ``scan`` (a Volume)."""
    start = time.time()
    result = product.predictor.segment(scan, probabilities=[int(i) for i in ids])
    return result["segmentation"], result["probabilities"], time.time() - start


def product(pairs):
    return harness.Product(None, RefinementSettings(), atlases=pairs)


def training_examples(pairs, one, ids_1, ids_5) -> dict:
    """{source: [Example]} (see the module docstring); never a validation subject. Kept in
    ``--work_dir`` (examples.npz), remade when it is removed."""
    cache = os.path.join(FLAGS.work_dir, "examples.npz")
    if os.path.isfile(cache):
        with np.load(cache) as stored:
            found = {}
            for key in stored.files:
                source, number, part = key.split("/")
                found.setdefault(source, {}).setdefault(int(number), {})[part] = stored[key]
        return {source: [Example.from_arrays(**parts[n]) for n in sorted(parts)]
                for source, parts in found.items()}
    found = _make_examples(pairs, one, ids_1, ids_5)
    np.savez(cache + ".tmp.npz", **{f"{source}/{n}/{part}": value
                                    for source, examples in found.items()
                                    for n, e in enumerate(examples)
                                    for part, value in (("inputs", e.inputs),
                                                        ("truth", e.truth))})
    os.replace(cache + ".tmp.npz", cache)
    return found


def _make_examples(pairs, one, ids_1, ids_5) -> dict:
    from ltnet_tf.io import volumes
    from ltnet_tf.labelling.intensity_model import IntensityModel
    from ltnet_tf.io.intensity import normalize_array
    from ltnet_tf.registration.native import brain_mask
    from scipy import ndimage

    atlas = volumes.load_scan(pairs[0][0])
    truth = volumes.load_label_map(pairs[0][1]).data
    found = {"reverse": [], "deformed": [], "loo": []}
    for subject in UNLABELLED:
        image = os.path.join(FLAGS.data_dir, "images", f"{subject}.nii.gz")
        scan = volumes.load_scan(image)
        pseudo = segment(one, scan, ids_1)[0]
        path = os.path.join(FLAGS.work_dir, f"pseudo_{subject}.nii.gz")
        volumes.save_nifti(pseudo, scan.affine, path, header=scan.header)
        labels, posterior, _ = segment(product([(image, path)]), atlas, ids_1)
        found["reverse"].append(Example(atlas.data, posterior, truth, ids_1))
        print(f"[reverse] {subject} -> atlas: Dice {dice(labels, truth):.3f}", flush=True)
    rng = np.random.default_rng(FLAGS.seed)
    model, mask = IntensityModel(), brain_mask(atlas.data)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in truth.shape], indexing="ij"))
    for number in range(FLAGS.deformed):
        field = np.stack([ndimage.gaussian_filter(rng.standard_normal(
            [-(-n // 4) for n in truth.shape]), 2)
                          for _ in range(3)])
        field = np.stack([ndimage.zoom(f, 4, order=1)[:truth.shape[0], :truth.shape[1],
                                                      :truth.shape[2]] for f in field])
        field *= FLAGS.deformation_voxels / np.sqrt(np.mean(field ** 2) * 3)
        moved = ndimage.map_coordinates(truth, grid + field, order=0, mode="nearest")
        result = model(normalize_array(atlas.data), mask, moved.astype(np.int32), (1.0,) * 3,
                       probabilities=[int(i) for i in ids_1])
        found["deformed"].append(Example(atlas.data, result.probabilities, truth, ids_1))
        print(f"[deformed] {number + 1}: Dice {dice(moved, truth):.3f} -> "
              f"{dice(result.labels, truth):.3f}", flush=True)
    for k, (image, labels_path) in enumerate(pairs):
        others = [pair for i, pair in enumerate(pairs) if i != k]
        scan = volumes.load_scan(image)
        labels, posterior, _ = segment(product(others), scan, ids_5)
        reference = volumes.load_label_map(labels_path).data
        found["loo"].append(Example(scan.data, posterior, reference, ids_5))
        print(f"[loo] {os.path.basename(image)} by the other four: Dice "
              f"{dice(labels, reference):.3f}", flush=True)
    return found


def dice(labels, reference) -> float:
    from ltnet_tf.io import evaluation
    from ltnet_tf.io.labels import BENCHMARK_LABELS

    return evaluation.mean_dice(evaluation.dice_per_label(labels, reference, BENCHMARK_LABELS),
                                BENCHMARK_LABELS)


def main(argv):
    del argv
    from ltnet_tf.io import volumes

    os.makedirs(FLAGS.work_dir, exist_ok=True)
    pairs = harness.atlas_pairs(FLAGS.data_dir, ["sub-01", "sub-02", "sub-03", "sub-04"])
    ids_1 = np.unique(volumes.load_label_map(pairs[0][1]).data)
    ids_5 = np.unique(np.concatenate([np.unique(volumes.load_label_map(p).data)
                                      for _, p in pairs]))
    results = {"command": harness.command_line({FLAGS.work_dir: "WORK"}),
               "git_commit": harness.git_commit(), "machine": harness.machine_line(),
               "load_start": os.getloadavg(), "sets": {}, "train_minutes": {}, "training": {}}
    one = product(pairs[:1])
    found = training_examples(pairs, one, ids_1, ids_5)
    sources = {"reverse": found["reverse"], "deformed": found["deformed"],
               "both": found["reverse"] + found["deformed"], "loo": found["loo"]}
    correctors = {}
    for name, examples in ((n, sources[n]) for n in FLAGS.sources):
        print(f"[train] {name}: {len(examples)} examples", flush=True)
        ids = ids_5 if name == "loo" else ids_1
        correctors[name], results["training"][name] = train(examples, len(ids), FLAGS.steps,
                                                            FLAGS.seed)
        results["train_minutes"][name] = results["training"][name]["minutes"]
    five = product(pairs)
    cases, results["set_info"] = harness.validation_sets(
        FLAGS.data_dir, os.path.join(FLAGS.work_dir, "validation"), ["shared", "miccai2012"])
    records = {}
    for case in cases:
        scan = volumes.load_scan(case.image_path)
        brain = scan.data > 0
        for count, base, prod, ids, names in (
                ("1", "best_1", one, ids_1, ("reverse", "deformed", "both")),
                ("5", "best_5", five, ids_5, ("loo",))):
            names = [n for n in names if n in correctors]
            labels, posterior, seconds = segment(prod, scan, ids)
            records.setdefault(base, []).append(harness.score(
                case, {"segmentation": labels, "seconds": seconds}, base))
            example = Example(scan.data, posterior, None, ids)
            for name in names:
                corrected, extra = correct(correctors[name], example, posterior, labels, ids,
                                           brain)
                key = f"corrected_{count}" + ("" if name in ("both", "loo") else f"_{name}")
                records.setdefault(key, []).append(harness.score(
                    case, {"segmentation": corrected, "seconds": seconds + extra}, key))
    for key, found_records in records.items():
        for set_name in SET_KEYS:
            mine = [r for r in found_records if r["set"] == set_name]
            results["sets"].setdefault(SET_KEYS[set_name], {})[key] = harness.dice_figures(
                mine, folding=False)
    results["load_end"] = os.getloadavg()
    harness.write_results(results, markdown, os.path.join(FLAGS.results_dir, "corrector"))


def markdown(results: dict) -> list:
    lines = ["# A learned corrector on the product's best answer: a probe", "",
             f"Command: `{results['command']}`, commit `{results['git_commit'][:12]}`; "
             f"{results['machine']}; load average at the start {results['load_start'][0]:.1f}, "
             f"at the end {results['load_end'][0]:.1f} (above 2: seconds are upper bounds).", "",
             "How each corrector was trained: `bench/corrector_probe.py`'s docstring. best_1 / "
             "best_5: the product's default (one atlas / five, joint label fusion, the intensity "
             "model on). corrected_1: the one-atlas corrector trained on both sources "
             "(`_reverse`, `_deformed`: on one); corrected_5: trained leave-one-out on the five "
             "atlases. Dice: the 28 structures of Table 1.", ""]
    targets = {"corrected_1": ("best_1", 0.015, 1.5), "corrected_5": ("best_5", 0.01, 1.3)}
    for set_name, entries in results["sets"].items():
        rows = []
        for name, e in entries.items():
            b = entries["best_5" if name.endswith("_5") else "best_1"]
            worst = np.nanmin([e["per_structure"][k] - b["per_structure"][k]
                               for k in b["per_structure"]])
            rows.append([name, f"{e['mean_dice']:.3f}", f"{e['mean_dice'] - b['mean_dice']:+.3f}",
                         f"{worst:+.3f}",
                         f"{e['seconds_per_scan']:.1f}",
                         f"{e['seconds_per_scan'] / b['seconds_per_scan']:.2f}"])
        lines += [f"## {set_name}", "", *table(["config", "Dice", "− best", "worst structure − "
                                                "best's", "s/scan", "time ratio"], rows), "",
                  "Per structure:", "", *harness.per_structure(entries), ""]
    rows = []
    for set_name, entries in results["sets"].items():
        for name, (base, gain, ratio) in targets.items():
            if name not in entries:
                continue
            e, b = entries[name], entries[base]
            rows.append([set_name, name, f"{e['mean_dice'] - b['mean_dice']:+.4f}", f">= +{gain}",
                         f"{e['seconds_per_scan'] / b['seconds_per_scan']:.2f}", f"<= {ratio}"])
    lines += ["## Targets", "", *table(["set", "config", "Dice − best", "target", "time ratio",
                                        "target"], rows), "",
              "Training (minutes, mean loss of the first and last 100 steps):", "",
              *table(["corrector", "minutes", "loss first", "loss last"], [
                  [k, f"{v['minutes']:.1f}", f"{v['loss_first_100']:.4f}",
                   f"{v['loss_last_100']:.4f}"] for k, v in results["training"].items()]), ""]
    return lines


if __name__ == "__main__":
    app.run(main)
