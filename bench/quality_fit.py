"""The quality model's fit and its scores (``bench.quality``): a logistic-link linear model of each
structure's Dice on the label transfer's signals (``ltnet_tf.prediction.quality``), fitted by
least squares with an L2 penalty, every scan weighing the same; the default threshold chosen on the
fit group; the figures on the held-out group.

The terms (signals of the structure or the scan, or a signal's mean over the scan's structures)
and the penalty are chosen among ``CANDIDATES`` × ``L2_GRID`` by leave-one-subject-out
cross-validation on the fit group alone (``select``); bench/results/quality.md lists the
comparison and the chosen terms with their weights.
"""
from __future__ import annotations

import math
import os

import numpy as np

from bench import degradations, harness
from bench.harness import table

CONFIG_TEXT = {"atlases_1": "one atlas", "atlases_3": "three atlases fused by joint label fusion"}
FAILURE, GOOD = 0.70, 0.75  # a scan below FAILURE must be flagged, one at GOOD or above not
# Candidate terms, compared by leave-one-subject-out cross-validation on the fit group.
STRUCTURE = (("ncc",), ("agreement",), ("relabelled",), ("separation",), ("intensity_sd",),
             ("edge",), ("outside",), ("log_jacobian_sd",), ("log_atlas_volume",),
             ("boundary_share",), ("log_volume_ratio",))
SCAN = (("brain_overlap",), ("correlation",), ("alignment_ok",), ("remapped",), ("loss",),
        ("loss_start",), ("fine_correlation",), ("log_scale",), ("anisotropy",),
        ("rotation_deg",), ("log_voxel_max",), ("atlases",), ("uncovered",), ("folded",),
        ("log_jacobian_sd",), ("noise",), ("model_changed",), ("model_uncertain",))
MEANS = tuple((f"mean_{name}",) for (name,) in STRUCTURE[:8] + STRUCTURE[10:])
CANDIDATES = {"structure": STRUCTURE, "structure + scan": STRUCTURE + SCAN,
              "structure + scan + means": STRUCTURE + SCAN + MEANS}
L2_GRID = (0.03, 0.1, 0.3, 1.0)  # penalties on the standardised weights


def usable(records: list) -> list:
    """Records of segmented scans (not refused), with signals, of the calibration's copies."""
    return [r for r in records if "refused" not in r and r.get("signals")
            and r["degradation"] in degradations.DEGRADATIONS]


def structure_rows(records: list, terms) -> tuple:
    """(X [rows, terms], Dice [rows], scan number [rows]) over the 28 structures of each scan,
    the terms' values as the product computes them (``quality.term_values``)."""
    from ltnet_tf.io.labels import BENCHMARK_LABELS
    from ltnet_tf.prediction.quality import term_values

    rows, dice, scan = [], [], []
    for number, record in enumerate(records):
        values = term_values(terms, record["signals"], [0, *BENCHMARK_LABELS])
        for label, value in record["dice"].items():
            if int(label) not in values or not math.isfinite(value):
                continue
            rows.append(values[int(label)])
            dice.append(value)
            scan.append(number)
    return np.asarray(rows, np.float64), np.asarray(dice, np.float64), np.asarray(scan)


def fit(records: list, terms, l2: float) -> dict:
    """The model's numbers ({'terms', 'centre', 'spread', 'low', 'high', 'weights', 'bias'};
    low/high: each term's range in ``records``, which the product clips to) fitted on
    ``records``: least squares of σ(b + w·x) on each structure's Dice, rows weighted so each scan
    counts once, + ``l2`` ‖w‖²."""
    from scipy.optimize import least_squares

    x, y, scan = structure_rows(records, terms)
    centre, spread = x.mean(0), x.std(0)
    spread[spread < 1e-9] = 1.0
    z = (x - centre) / spread
    per_scan = np.bincount(scan)
    row_weight = np.sqrt(1.0 / per_scan[scan])

    design = np.c_[np.ones(len(z)), z]
    penalty = math.sqrt(l2) * np.eye(len(terms) + 1)[1:]

    def residuals(p):
        predicted = 1.0 / (1.0 + np.exp(-(design @ p)))
        return np.concatenate([row_weight * (predicted - y), penalty @ p])

    def jacobian(p):
        predicted = 1.0 / (1.0 + np.exp(-(design @ p)))
        slope = row_weight * predicted * (1.0 - predicted)
        return np.vstack([design * slope[:, None], penalty])

    start = np.zeros(len(terms) + 1)
    start[0] = math.log(y.mean() / (1 - y.mean()))
    solution = least_squares(residuals, start, jac=jacobian, method="trf", x_scale="jac")
    return {"terms": [list(t) for t in terms], "centre": centre.tolist(),
            "spread": spread.tolist(), "low": x.min(0).tolist(), "high": x.max(0).tolist(),
            "weights": solution.x[1:].tolist(),
            "bias": float(solution.x[0])}


def scan_predictions(records: list, model) -> np.ndarray:
    """The expected mean Dice of each record (``QualityModel.predict``)."""
    from ltnet_tf.io.labels import BENCHMARK_LABELS
    return np.array([model.predict(r["signals"], [0, *BENCHMARK_LABELS])["expected_dice"]
                     for r in records])


def cross_validate(records: list, terms, l2: float) -> dict:
    """Leave-one-subject-out on ``records``: each subject's scans predicted by the model fitted
    on the others; {'spearman', 'mae_scan'} of those predictions."""
    from scipy.stats import spearmanr

    from ltnet_tf.prediction.quality import QualityModel

    expected, true = [], []
    for subject in sorted({r["subject"] for r in records}):
        held = [r for r in records if r["subject"] == subject]
        model = QualityModel({**fit([r for r in records if r["subject"] != subject], terms, l2),
                              "min_quality": 0.0})
        expected += list(scan_predictions(held, model))
        true += [r["mean_dice"] for r in held]
    expected, true = np.array(expected), np.array(true)
    return {"spearman": float(spearmanr(expected, true).correlation),
            "mae_scan": float(np.mean(np.abs(expected - true)))}


def select(records: list) -> tuple:
    """(terms, l2, the cross-validation table): the candidate (``CANDIDATES`` × ``L2_GRID``)
    with the best leave-one-subject-out rank correlation on ``records`` (the fit group)."""
    table_, best = [], None
    for name, terms in CANDIDATES.items():
        for l2 in L2_GRID:
            scores = cross_validate(records, terms, l2)
            table_.append({"terms": name, "l2": l2, **scores})
            print(f"cross-validation: {name}, l2 {l2}: Spearman {scores['spearman']:.3f}, "
                  f"MAE {scores['mae_scan']:.4f}", flush=True)
            key = (round(scores["spearman"], 3), -scores["mae_scan"])
            if best is None or key > best[0]:
                best = (key, terms, l2)
    return best[1], best[2], table_


def choose_threshold(expected: np.ndarray, true: np.ndarray) -> float:
    """The threshold that best separates failures (true Dice < FAILURE) from good scans (≥ GOOD):
    the most failures below it minus good scans below it (recall − false-alarm rate), the middle
    of the best range."""
    failures, good = true < FAILURE, true >= GOOD
    grid = np.round(np.arange(0.40, 0.90, 0.005), 3)
    score = np.array([(expected[failures] < t).mean() - (expected[good] < t).mean()
                      for t in grid])
    best = np.flatnonzero(score >= score.max() - 1e-12)
    return float(np.round((grid[best[0]] + grid[best[-1]]) / 2, 3))


# ------------------------------------------------------------------------------ fit and save
def fit_and_save(records: list, fit_subjects, provenance: dict, path: str = None) -> dict:
    """The model fitted on the records of ``fit_subjects`` and its default threshold, written to
    the package's ``quality_model.json`` (or ``path``); -> its content."""
    from ltnet_tf.files import write_json
    from ltnet_tf.prediction.quality import MODEL_FILE, QualityModel

    fit_records = [r for r in usable(records) if r["subject"] in fit_subjects]
    terms, l2, selection = select(fit_records)
    spec = fit(fit_records, terms, l2)
    spec["min_quality"] = 0.0
    true = np.array([r["mean_dice"] for r in fit_records])
    spec["min_quality"] = choose_threshold(scan_predictions(fit_records, QualityModel(spec)), true)
    spec = {"description": "Expected Dice per structure: σ(bias + Σ weights · (term clipped "
                           "to [low, high] − centre) / spread), a term a signal of ltnet_tf.prediction.quality_signals or "
                           "the product of two; per scan the mean over its structures. "
                           "min_quality: the default threshold of predict.py --min_quality.",
            "fitted_by": provenance["command"], "git_commit": provenance["git_commit"],
            "fit_subjects": present(fit_subjects, fit_records),
            "fit_scans": len(fit_records), "l2": l2, "selection": selection,
            "threshold_rule": f"maximises the share of fit scans with true Dice < {FAILURE} "
                              f"below it minus the share of those with true Dice >= {GOOD} "
                              f"below it (the middle of the best range)",
            **spec}
    write_json(spec, path or MODEL_FILE)
    print(f"wrote {harness.portable(path or MODEL_FILE)} ({len(fit_records)} fit scans, "
          f"default threshold {spec['min_quality']})", flush=True)
    return spec


def present(subjects, records: list) -> list:
    """The subjects of ``subjects`` that have records (a shorter run names only those)."""
    return [s for s in subjects if any(r["subject"] == s for r in records)]


# ------------------------------------------------------------------------------ scores
def figures(records: list, model, threshold: float) -> dict:
    """The calibration figures of ``records`` (see bench.quality's docstring)."""
    from scipy.stats import spearmanr

    from ltnet_tf.io.labels import BENCHMARK_LABELS, structure_name

    if not records:
        return {"n_scans": 0}
    true = np.array([r["mean_dice"] for r in records])
    expected = scan_predictions(records, model)
    failures, good = true < FAILURE, true >= GOOD
    errors = {structure_name(label): [] for label in BENCHMARK_LABELS}
    for record in records:
        values = model.structure_values(record["signals"], [0, *BENCHMARK_LABELS])
        for label in BENCHMARK_LABELS:
            dice = record["dice"][str(label)]
            if math.isfinite(dice):
                errors[structure_name(label)].append(abs(values.get(label, 0.0) - dice))
    quality_seconds = np.array([r["stages"].get("quality", 0.0) for r in records])
    total_seconds = np.array([r["seconds"] for r in records])
    quality_cpu = np.array([r["cpu_stages"].get("quality", 0.0) for r in records])
    total_cpu = np.array([r["cpu_seconds"] for r in records])
    return {
        "n_scans": len(records), "n_failures": int(failures.sum()), "n_good": int(good.sum()),
        "spearman": float(spearmanr(expected, true).correlation) if len(records) > 2 else None,
        "threshold": threshold,
        "failure_recall": float(np.mean(expected[failures] < threshold)) if failures.any()
        else None,
        "false_alarm_rate": float(np.mean(expected[good] < threshold)) if good.any() else None,
        "mae_scan": float(np.mean(np.abs(expected - true))),
        "mae_structure": float(np.mean([e for v in errors.values() for e in v])),
        "mae_per_structure": {k: float(np.mean(v)) for k, v in errors.items() if v},
        "seconds_added_per_scan": float(quality_seconds.mean()),
        "share_of_scan_seconds": float(np.mean(quality_seconds / total_seconds)),
        "cpu_seconds_added_per_scan": float(quality_cpu.mean()),
        "share_of_scan_cpu_seconds": float(np.mean(quality_cpu / total_cpu)),
        "scans": [{"config": r["config"], "subject": r["subject"],
                   "degradation": r["degradation"], "true": float(t), "expected": float(e),
                   "parameters": r["parameters"]} for r, t, e in zip(records, true, expected)]}


def by_degradation(entry: dict) -> list:
    """Rows of [degradation, n, true mean, expected mean, MAE, flagged] of a figures entry."""
    rows, threshold = [], entry.get("threshold")
    for name in dict.fromkeys(s["degradation"] for s in entry.get("scans", [])):
        scans = [s for s in entry["scans"] if s["degradation"] == name]
        true, expected = (np.array([s[k] for s in scans]) for k in ("true", "expected"))
        rows.append([name, len(scans), f"{true.mean():.3f} ({true.min():.3f}–{true.max():.3f})",
                     f"{expected.mean():.3f}", f"{np.abs(true - expected).mean():.3f}",
                     f"{int(np.sum(expected < threshold))}"])
    return rows


TARGETS = (("n_scans", ">=", 40), ("spearman", ">=", 0.8), ("failure_recall", ">=", 0.9),
           ("false_alarm_rate", "<=", 0.1))


def score_and_write(records: list, results_dir: str, fit_subjects, held_out, provenance: dict,
                    configs) -> dict:
    """The package's model scored on the held-out subjects (and, for reference, on the fit
    group it was fitted on); bench/results/quality.json and .md."""

    from ltnet_tf.prediction.quality import MODEL_FILE, QualityModel

    model = QualityModel.load(MODEL_FILE)
    if model is None:
        raise SystemExit(f"{harness.portable(MODEL_FILE)}: no model yet: run the fit stage")
    segmented = usable(records)
    groups = {"held_out": [r for r in segmented if r["subject"] in held_out],
              "fit_group": [r for r in segmented if r["subject"] in fit_subjects]}
    threshold = model.min_quality
    results = {**provenance, "machine": harness.machine_line(),
               "fit_subjects": present(fit_subjects, groups["fit_group"]),
               "held_out_subjects": present(held_out, groups["held_out"]),
               "configs": list(configs), "degradations": list(degradations.DEGRADATIONS),
               "model": {k: model.spec[k] for k in ("terms", "weights", "bias", "min_quality",
                                                    "fit_scans", "l2", "threshold_rule",
                                                    "selection")},
               "refused": [{"config": r["config"], "subject": r["subject"],
                            "degradation": r["degradation"], "why": r["refused"]}
                           for r in records if "refused" in r]}
    for group, found in groups.items():
        results[group] = figures(found, model, threshold)
        results[group]["per_config"] = {
            config: {k: v for k, v in figures([r for r in found if r["config"] == config],
                                              model, threshold).items() if k != "scans"}
            for config in configs}
    apart = [r for r in records if "refused" not in r and r.get("signals")
             and r["degradation"] in degradations.UNDETECTABLE and r["subject"] in held_out]
    results["undetectable"] = figures(apart, model, threshold)
    results["load_average_1_5_15min"]["end"] = os.getloadavg()
    results["targets"] = [{"figure": name, "target": f"{op} {bound}",
                           "value": results["held_out"].get(name),
                           "met": _met(results["held_out"].get(name), op, bound)}
                          for name, op, bound in TARGETS]
    harness.write_results(results, markdown, os.path.join(results_dir, "quality"))
    return results


def _met(value, op, bound) -> bool:
    if value is None:
        return False
    return value >= bound if op == ">=" else value <= bound


def markdown(results: dict) -> list:
    held, fitted = results["held_out"], results["fit_group"]
    model = results["model"]
    lines = [
        "# Expected Dice without a reference: calibration", "",
        f"Command: `{results['command']}`, commit `{results['git_commit'][:12]}`; "
        f"{results['machine']}; load average at the start "
        f"{results['load_average_1_5_15min']['start'][0]:.1f}, at the end "
        f"{results['load_average_1_5_15min']['end'][0]:.1f} (a shared machine: seconds are "
        f"upper bounds).", "",
        "Targets: subjects of the shared data on their own grids, clean and in each degraded "
        "copy of `bench/degradations.py`, segmented by predict.py's default label transfer "
        "(refinement, the intensity model) with "
        + " and with ".join(CONFIG_TEXT.get(c, c) for c in results["configs"])
        + f" ({', '.join(results['configs'])}). "
        f"Fitted on {', '.join(results['fit_subjects'])} "
        f"({model['fit_scans']} scans); scored on {', '.join(results['held_out_subjects'])}, "
        "never used for the fit or for choosing its terms. Dice: the 28 structures of Table 1 "
        "against each copy's reference labels (moved with it).", "",
        "## Held-out subjects", "",
        *table(["figure", "value", "target", "met"], [
            [t["figure"], _format(t["value"]), t["target"], "yes" if t["met"] else "**no**"]
            for t in results["targets"]]), "",
        *table(["", "all", *held["per_config"]], [
            [name, _format(held.get(name)), *(_format(e.get(name))
                                              for e in held["per_config"].values())]
            for name in ("n_scans", "n_failures", "n_good", "spearman", "failure_recall",
                         "false_alarm_rate", "mae_scan", "mae_structure",
                         "seconds_added_per_scan", "share_of_scan_seconds",
                         "cpu_seconds_added_per_scan", "share_of_scan_cpu_seconds")]), "",
        f"Default threshold (`--min_quality`): **{model['min_quality']}**, "
        f"{model['threshold_rule']}; failures: true mean Dice < {FAILURE}, good: ≥ {GOOD}.", "",
        "Per degradation (held out; n, true mean Dice (range), expected, mean absolute error, "
        "scans below the threshold):", "",
        *table(["copy", "n", "true Dice", "expected", "MAE", "flagged"], by_degradation(held)),
        "",
        "A left-right flipped header (`lr_flip`, scored apart: a mirrored brain is a plausible "
        "brain, and no check without a reference can tell it):", "",
        *table(["copy", "n", "true Dice", "expected", "MAE", "flagged"],
               by_degradation(results["undetectable"])), "",
        "Mean absolute error per structure (held out):", "",
        *table(["structure", "MAE"], [[k, f"{v:.3f}"]
                                      for k, v in held.get("mae_per_structure", {}).items()]),
        "",
        "## The fit group (in-sample, for reference)", "",
        *table(["figure", "value"], [[name, _format(fitted.get(name))] for name in (
            "n_scans", "spearman", "failure_recall", "false_alarm_rate", "mae_scan",
            "mae_structure")]), "",
        "## The model", "",
        "Chosen by leave-one-subject-out cross-validation on the fit group (the held-out "
        "subjects play no part): the candidate with the best rank correlation.", "",
        *table(["terms", "L2", "Spearman (CV)", "MAE per scan (CV)"], [
            [c["terms"], c["l2"], f"{c['spearman']:.3f}", f"{c['mae_scan']:.4f}"]
            for c in model["selection"]]), "",
        f"Logistic link, least squares with an L2 penalty of {model['l2']} on the standardised "
        f"weights; bias {model['bias']:.3f}.", "",
        *table(["term", "weight (per spread)"], [
            [" × ".join(t), f"{w:+.3f}"] for t, w in zip(model["terms"], model["weights"])]), ""]
    if results["refused"]:
        lines += ["Refused by predict.py's checks (not segmented, not scored):", "",
                  *table(["config", "subject", "copy", "why"], [
                      [r["config"], r["subject"], r["degradation"], r["why"][:120]]
                      for r in results["refused"]]), ""]
    return lines


def _format(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}"
