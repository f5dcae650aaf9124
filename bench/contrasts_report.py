"""The summary and the markdown page of ``bench.contrasts`` (bench/results/contrasts.md)."""
from __future__ import annotations

import numpy as np

from bench.harness import table

CONTRASTS = ("t1", "t2", "flair", "pd")
OTHERS = ("t2", "flair", "pd")
NAMES = {"t1": "T1", "t2": "T2-like", "flair": "FLAIR-like", "pd": "PD-like"}
KIND_NAMES = {"intensities": "mapped from the T1's intensities (no labels)",
              "labels": "made from the label map (with the scan's texture)"}


def _mean(values, digits=4):
    values = list(values)
    return round(float(np.mean(values)), digits) if values else None


def _by_kind(entries: dict) -> dict:
    """{kind: {'mean_dice' {contrast}, 'seconds_per_scan' {contrast}, 'cpu_seconds_per_scan',
    'gap' {contrast: mean Dice - T1's}, 'seconds_ratio' {contrast: / T1's}, 'handled',
    'scans'}} of one configuration's {scan: {'t1', kind: {contrast}}}."""
    kinds = sorted({k for e in entries.values() for k in e if k != "t1"})
    found = {}
    for kind in kinds:
        scans = [s for s, e in entries.items() if kind in e and "t1" in e]
        figure = {c: [entries[s]["t1"] if c == "t1" else entries[s][kind].get(c) for s in scans]
                  for c in CONTRASTS}
        figure = {c: [f for f in v if f] for c, v in figure.items()}
        dice = {c: _mean(f["dice"] for f in v) for c, v in figure.items()}
        seconds = {c: _mean((f["seconds"] for f in v), 2) for c, v in figure.items()}
        others = [f for c in OTHERS for f in figure[c]]
        cpu = {c: _mean((f["cpu_seconds"] for f in v), 2) for c, v in figure.items()}
        found[kind] = {
            "scans": scans, "mean_dice": dice, "seconds_per_scan": seconds,
            "cpu_seconds_per_scan": cpu,
            "gap": {c: None if dice[c] is None or dice["t1"] is None
                    else round(dice[c] - dice["t1"], 4) for c in OTHERS},
            "seconds_ratio": {c: None if not seconds["t1"] or seconds[c] is None
                              else round(seconds[c] / seconds["t1"], 2) for c in OTHERS},
            "cpu_seconds_ratio": {c: None if not cpu["t1"] or cpu[c] is None
                                  else round(cpu[c] / cpu["t1"], 2) for c in OTHERS},
            "handled": f"{sum(f['diagnosis'] == 'contrast' for f in others)}/{len(others)}",
            "similarities": sorted({f["similarity"] for f in others}),
        }
    return found


def _diagnosis(found: dict) -> dict:
    """{group: {'n', 'diagnoses' {name: count}, figure ranges}} of the diagnosis section."""
    groups = {}
    for part, scans in found.items():
        for entries in scans.values():
            for case, figures in entries.items():
                what, contrast = case.split("/")
                group = (f"{what} {contrast}" if part == "correct" else
                         f"broken: {what}" + ("" if contrast == "t1" else f", {contrast}"))
                groups.setdefault(group, []).append(figures)
    summary = {}
    for group, entries in groups.items():
        diagnoses = {}
        for e in entries:
            diagnoses[e["diagnosis"]] = diagnoses.get(e["diagnosis"], 0) + 1
        named = {}
        for e in entries:
            named[e["contrast"]] = named.get(e["contrast"], 0) + 1
        summary[group] = {"n": len(entries), "diagnoses": diagnoses, "contrast_named": named, **{
            key: [round(min(e[key] for e in entries), 3), round(max(e[key] for e in entries), 3)]
            for key in ("brain_overlap", "correlation", "local_correlation")}}
    return summary


def summarise(results: dict) -> dict:
    summary = {}
    for section in ("segmentation", "fusion"):
        if results.get(section):
            summary[section] = {config: _by_kind(entries)
                                for config, entries in results[section].items()}
    product = summary.get("segmentation", {}).get("product", {}).get("intensities")
    if product:
        summary["mean_dice"] = product["mean_dice"]
    if results.get("alignment"):
        summary["alignment"] = {kind: {c: {
            "dice_own_alignment": _mean(s[c]["dice_own_alignment"] for s in scans.values()),
            "dice_t1_alignment": _mean(s[c]["dice_t1_alignment"] for s in scans.values()),
            "affine_distance_mm": _mean((s[c]["affine_distance_mm"] for s in scans.values()), 3)}
            for c in OTHERS} for kind, scans in results["alignment"].items()}
    if results.get("diagnosis"):
        summary["diagnosis"] = _diagnosis(results["diagnosis"])
    return summary


# ------------------------------------------------------------------------------- contrasts.md
def _f(value, form=".4f"):
    return "–" if value is None else format(value, form)


def _targets(summary: dict, targets: dict) -> list:
    lines = []
    for section, label in (("segmentation", "one atlas"), ("fusion", "five atlases, JLF")):
        for kind, e in summary.get(section, {}).get("product", {}).items():
            checks = [f"{NAMES[c]} {_f(e['gap'][c], '+.4f')} (target >= -{targets[c]})"
                      for c in OTHERS]
            ratio = max((r for r in e["seconds_ratio"].values() if r is not None), default=None)
            cpu = max((r for r in e.get("cpu_seconds_ratio", {}).values() if r is not None),
                      default=None)
            lines.append(f"- {label}, {kind}: T1 {_f(e['mean_dice']['t1'])}; gaps to it "
                         + ", ".join(checks) + f"; seconds at most {_f(ratio, '.2f')}x the "
                         f"T1's (target <= {targets['seconds_ratio']}; CPU seconds {_f(cpu, '.2f')}x: "
                         f"less changed by other jobs); handled as another "
                         f"contrast: {e['handled']}")
    return lines


def _kind_table(entries: dict) -> list:
    rows = []
    for config, kinds in entries.items():
        for kind, e in kinds.items():
            rows.append([config, kind, *(_f(e["mean_dice"][c]) for c in CONTRASTS),
                         *(_f(e["seconds_per_scan"][c], ".1f") for c in CONTRASTS),
                         ", ".join(e["similarities"]), e["handled"]])
    return table(["configuration", "kind", *(f"Dice {NAMES[c]}" for c in CONTRASTS),
                  *(f"s {NAMES[c]}" for c in CONTRASTS), "similarity used", "handled"], rows)


def _scan_table(entries: dict, kind: str) -> list:
    rows = []
    for scan, e in entries.items():
        if kind not in e:
            continue
        for contrast in CONTRASTS:
            f = e["t1"] if contrast == "t1" else e[kind].get(contrast)
            if f:
                rows.append([scan, NAMES[contrast], _f(f["dice"]), _f(f["seconds"], ".1f"),
                             _f(f["cpu_seconds"], ".1f"), f["similarity"], f["contrast"] or "–",
                             f["line"]])
    return table(["scan", "contrast", "Dice", "s", "CPU s", "similarity", "named",
                  "diagnosis line"], rows)


def _coverage(results: dict) -> list:
    """Lines saying which scans each section holds, and whether that is a subset of the full
    command's (a run stopped early, or run with fewer ``--scans``)."""
    from bench.harness import MICCAI_SUBJECTS, SHARED_SUBJECTS

    full = list(SHARED_SUBJECTS + MICCAI_SUBJECTS)
    lines = []
    for section in ("segmentation", "fusion", "alignment"):
        found = results.get(section) or {}
        scans = sorted({s for entries in found.values() for s in entries})
        if scans:
            part = "all" if set(full) <= set(scans) else "**a subset**:"
            lines.append(f"- {section}: {part} {len(scans)} of the {len(full)} scans "
                         f"({', '.join(scans)})")
    if results.get("diagnosis"):
        native = len(results["diagnosis"].get("correct", {}))
        part = "all" if native >= 25 else "**a subset**:"
        lines.append(f"- diagnosis: {part} {native} of the 25 native scans, broken inputs from "
                     f"{len(results['diagnosis'].get('broken', {}))} of 4")
    return (["Scans measured:", "", *lines, ""]) if lines else []


def markdown(results: dict) -> list:
    summary, targets = results.get("summary", {}), results["targets"]
    runs = "; ".join(f"{section}: `{run['command']}` at commit `{run['git_commit'][:12]}` "
                     f"(load {run['load_average_1_5_15min']['start'][0]:.1f} -> "
                     f"{run['load_average_1_5_15min'].get('end', [float('nan')])[0]:.1f})"
                     for section, run in results.get("runs", {}).items())
    lines = ["# T2-, FLAIR- and PD-like scans with a T1 atlas", "",
             f"{runs}. On a 2-core CPU shared with other jobs where the load exceeded 2: seconds "
             "are upper bounds. Scans on their own grids, segmented as `predict.py --atlas` "
             "does (alignment included), Dice of the 28 benchmark structures; seconds: "
             "segmentation of a scan in memory (alignment to labels), the first scan of a "
             "process (tracing) excluded. How each contrast is made: `bench/synthetic_contrasts.py`"
             " (two kinds: " + "; ".join(f"`{k}`: {v}" for k, v in KIND_NAMES.items()) + ").",
             ""]
    lines += _coverage(results)
    if results.get("predictor_options"):
        lines += [f"Product configuration: `--similarity auto` with Predictor options "
                  f"`{results['predictor_options']}`.", ""]
    lines += ["## Targets", "", *_targets(summary, targets), ""]
    for section, title in (("segmentation", "One atlas"), ("fusion", "Five atlases")):
        if summary.get(section):
            lines += [f"## {title}: mean Dice and seconds per scan", "",
                      *_kind_table(summary[section]), ""]
    for kind in KIND_NAMES:
        entries = results.get("segmentation", {}).get("product", {})
        if any(kind in e for e in entries.values()):
            lines += [f"## One atlas, per scan ({kind}: {KIND_NAMES[kind]})", "",
                      *_scan_table(entries, kind), ""]
    if summary.get("alignment"):
        lines += ["## Does the alignment lose other contrasts?", "",
                  "Each remapped scan segmented (product configuration) with its own alignment "
                  "and with its T1's; the distance is the mean over the brain of the two affines' "
                  "displacement.", "", *table(
                      ["kind", "contrast", "Dice, own alignment", "Dice, the T1's alignment",
                       "affine distance (mm)"],
                      [[kind, NAMES[c], _f(e["dice_own_alignment"]), _f(e["dice_t1_alignment"]),
                        _f(e["affine_distance_mm"], ".2f")]
                       for kind, contrasts in summary["alignment"].items()
                       for c, e in contrasts.items()]), ""]
    if summary.get("diagnosis"):
        lines += ["## Diagnosis", "",
                  "Alignment figures of the 25 native scans of the data in every contrast and "
                  "kind, and of broken inputs made from four of them, with the product's "
                  "diagnosis and the contrast it names.", "", *table(
                      ["group", "n", "diagnoses", "named", "brain overlap", "correlation",
                       "local correlation"],
                      [[group, e["n"], ", ".join(f"{k} {v}" for k, v in e["diagnoses"].items()),
                        ", ".join(f"{k} {v}" for k, v in e["contrast_named"].items()),
                        *(f"{e[k][0]:.3f}–{e[k][1]:.3f}" for k in
                          ("brain_overlap", "correlation", "local_correlation"))]
                       for group, e in summary["diagnosis"].items()]), ""]
    return lines
