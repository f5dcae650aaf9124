"""``report.html``: one static page to check a prediction run by eye before trusting its volumes.

Built from the record ``predict.py`` writes as ``prediction.json`` (in the spirit of fMRIPrep's
report): what produced the segmentations, a summary of all scans with the flagged ones first, then
per scan its QC picture (``ltnet_tf.reporting.qc``), alignment figures, refinement loss, structure volumes,
Dice when references were given, and every warning. The page is self-contained - pictures embedded
as base64 data URIs, CSS inline, no JavaScript - so it opens offline and can be mailed or archived
as one file. Every string from the record is HTML-escaped (scan names are user file names).
"""
from __future__ import annotations

import base64
import datetime
import html
import math
import os

import ltnet_tf
from ltnet_tf.files import atomic_write
from ltnet_tf.io.labels import FREESURFER_NAMES

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_LABEL_IDS = {name: label for label, name in FREESURFER_NAMES.items()}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 0 auto; max-width: 1320px; padding: 16px 24px; color: #1d1d1f; background: #fafafa; }
h1 { font-size: 1.5em; margin: 0.2em 0; } h2 { font-size: 1.25em; margin: 0 0 0.4em 0; }
h3 { font-size: 1em; margin: 0.8em 0 0.3em 0; }
table { border-collapse: collapse; font-size: 0.9em; background: white; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eeeeee; }
.meta td { min-width: 28em; max-width: 1000px; overflow-wrap: anywhere; }
.scan { background: white; border: 1px solid #d0d0d0; border-radius: 6px; padding: 12px 16px;
        margin: 18px 0; }
.scan.flagged { border: 2px solid #b00020; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 0.85em;
         font-weight: bold; color: white; background: #2e7d32; }
.badge.flagged { background: #b00020; }
.warnings { background: #fdecea; border-left: 6px solid #b00020; padding: 6px 12px; margin: 8px 0;
            font-weight: bold; color: #7f0016; }
.warnings ul { margin: 4px 0; padding-left: 20px; }
.qc { max-width: 100%; height: auto; border: 1px solid #d0d0d0; display: block; margin: 6px 0; }
.columns { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #555;
          vertical-align: middle; }
.bar { display: inline-block; height: 0.7em; background: #1565c0; vertical-align: middle; }
.paths { font-size: 0.8em; color: #555; overflow-wrap: anywhere; }
.note { color: #555; font-size: 0.85em; }
tr.flagged td { background: #fdecea; }
"""


# ------------------------------------------------------------------------------------ formatting
def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _number(value, digits: int = 3) -> str:
    """A finite number with ``digits`` decimals, or "n/a" (None, NaN, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def _table(header, rows, css_class="", row_classes=None) -> str:
    """rows: lists of (already escaped) cell HTML; a cell given as (html, "num") is right-aligned,
    one given as (html, "th") is a row heading. No heading row when ``header`` is None."""
    head = f"<tr>{''.join(f'<th>{cell}</th>' for cell in header)}</tr>" if header else ""
    body = []
    for number, row in enumerate(rows):
        cells = "".join(_cell(c) for c in row)
        row_class = (row_classes or {}).get(number)
        body.append(f'<tr class="{row_class}">{cells}</tr>' if row_class else f"<tr>{cells}</tr>")
    attribute = f' class="{css_class}"' if css_class else ""
    return f"<table{attribute}>{head}{''.join(body)}</table>"


def _cell(cell) -> str:
    if not isinstance(cell, tuple):
        return f"<td>{cell}</td>"
    content, kind = cell
    return f"<th>{content}</th>" if kind == "th" else f'<td class="{kind}">{content}</td>'



# ------------------------------------------------------------------------------------ the record
def _scans(prediction: dict) -> dict:
    scans = prediction.get("scans") or {}
    return {str(name): (record if isinstance(record, dict) else {})
            for name, record in scans.items()}


def flag_reasons(name: str, record: dict, alignment_failed=()) -> list:
    """Why a scan needs a look: its alignment looked wrong, its expected Dice is below the run's
    ``--min_quality``, or it has warnings ([] if none)."""
    reasons = []
    if record.get("alignment_ok") is False or name in alignment_failed:
        reasons.append("alignment looks wrong")
    quality = _quality(record)
    if quality.get("below_min_quality"):
        reasons.append(f"expected Dice {_number(quality.get('expected_dice'), 2)} below "
                       f"{_number(quality.get('min_quality'), 2)}")
    warnings = record.get("warnings") or []
    if warnings:
        reasons.append(f"{len(warnings)} warning{'s' if len(warnings) > 1 else ''}")
    return reasons


def flagged_first(prediction: dict) -> list:
    """[(name, record, reasons)] with flagged scans first, each group worst first (by expected
    Dice; scans without one after the others, in the record's order)."""
    failed = set(prediction.get("alignment_failed") or [])
    entries = [(name, record, flag_reasons(name, record, failed))
               for name, record in _scans(prediction).items()]
    return sorted(entries, key=lambda entry: (not entry[2], _expected(entry[1])))


def _quality(record: dict) -> dict:
    quality = record.get("quality")
    return quality if isinstance(quality, dict) else {}


def _expected(record: dict) -> float:
    value = _quality(record).get("expected_dice")
    return float(value) if _number(value) != "n/a" else math.inf


def _low_structures(record: dict) -> str:
    low = _quality(record).get("low") or []
    return ", ".join(f"{entry.get('structure')} {_number(entry.get('expected_dice'), 2)}"
                     for entry in low if isinstance(entry, dict))


def _total_volume_ml(record: dict):
    volumes = [v for v in (record.get("volumes_mm3") or {}).values()
               if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(volumes) / 1000.0 if volumes else None


def _atlases(prediction: dict) -> list:
    atlases = prediction.get("atlases")
    if atlases is None and prediction.get("atlas") is not None:
        atlases = [prediction["atlas"]]
    described = []
    for atlas in atlases or []:
        if isinstance(atlas, dict):
            described.append(" + ".join(str(atlas[k]) for k in ("image", "labels") if atlas.get(k)))
        else:
            described.append(str(atlas))
    return described


def _settings(settings) -> str:
    if not settings:
        return "off"
    if isinstance(settings, dict):
        return ", ".join(f"{key} = {value}" for key, value in settings.items())
    return str(settings)


# ------------------------------------------------------------------------------------ page parts
def _header(prediction: dict, entries: list) -> str:
    model = prediction.get("model_dir")
    n_flagged = sum(1 for entry in entries if entry[2])
    written = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    rows = [("model", model if model else "no network (atlas labels moved by the alignment only)"),
            ("weights", prediction.get("source")),
            ("labels made by", prediction.get("labels_by")),
            ("atlases", "; ".join(_atlases(prediction)) or None),
            ("label fusion", prediction.get("fusion") or "none (one atlas)"),
            ("refinement", _settings(prediction.get("refinement"))),
            ("intensity model", _settings(prediction.get("intensity_model"))
             if "intensity_model" in prediction else None),
            ("alignment", prediction.get("align")),
            ("quality check", _quality_check(prediction)),
            ("mean Dice", _number(prediction.get("mean_dice"), 4)
             if prediction.get("mean_dice") is not None else None),
            ("scans", f"{len(entries)} ({n_flagged} flagged)"),
            ("written", f"{written} by ltnet_tf {ltnet_tf.__version__}")]
    table = _table(None, [[(_e(k), "th"), _e(v)] for k, v in rows if v is not None], "meta")
    return f"<h1>ltnet-tf segmentation report</h1>{table}"


def _quality_check(prediction: dict):
    """'expected Dice below 0.72: 3 scans flagged' (None when no quality was estimated)."""
    quality = prediction.get("quality")
    if not isinstance(quality, dict) or _number(quality.get("min_quality")) == "n/a":
        return None
    flagged = prediction.get("quality_flagged") or []
    return (f"expected Dice below {_number(quality['min_quality'], 2)} flagged: {len(flagged)} "
            f"scan{'s' if len(flagged) != 1 else ''}")


def _summary(entries: list) -> str:
    rows, row_classes = [], {}
    for index, (name, record, reasons) in enumerate(entries):
        alignment = record.get("alignment") or {}
        status = (f'<span class="badge flagged">FLAGGED</span> {_e("; ".join(reasons))}' if reasons
                  else '<span class="badge">ok</span>')
        rows.append([f'<a href="#scan-{index}">{_e(name)}</a>', status,
                     (_number(_quality(record).get("expected_dice")), "num"),
                     _e(_low_structures(record)),
                     (_number(record.get("mean_dice")), "num"),
                     (_number(alignment.get("brain_overlap")), "num"),
                     (_number(alignment.get("correlation")), "num"),
                     (_number(_total_volume_ml(record), 1), "num"),
                     (_number((record.get("seconds") or {}).get("total"), 1), "num")])
        if reasons:
            row_classes[index] = "flagged"
    header = ["scan", "status", "expected Dice", "lowest structures (expected Dice)", "mean Dice",
              "brain overlap", "correlation", "labelled volume (mL)", "seconds"]
    if not rows:
        return "<h2>Scans</h2><p>This run has no scans.</p>"
    return (f"<h2>Scans (flagged first, then worst expected Dice first)</h2>"
            f'<p class="note">Expected Dice: predicted without a reference from what the label '
            f"transfer left (its fit and calibration: bench/results/quality.md).</p>"
            f"{_table(header, rows, row_classes=row_classes)}")


def _qc_picture(output_dir: str, name: str, record: dict) -> str:
    picture = record.get("qc_png")
    if not picture:
        return '<p class="note">No QC picture was written for this scan.</p>'
    path = os.path.join(output_dir, str(picture))
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as error:
        return (f'<p class="warnings">QC picture {_e(picture)} could not be read '
                f"({_e(error.strerror)})</p>")
    if not content.startswith(PNG_SIGNATURE):
        return f'<p class="warnings">QC picture {_e(picture)} is not a PNG file</p>'
    encoded = base64.b64encode(content).decode("ascii")
    return (f'<img class="qc" src="data:image/png;base64,{encoded}" '
            f'alt="QC picture of {_e(name)}: slices with segmentation outlines">')


def _alignment(record: dict) -> str:
    alignment = record.get("alignment")
    ok = record.get("alignment_ok")
    verdict = {True: "looks right", False: "LOOKS WRONG: check this scan"}.get(ok, "not checked")
    if not isinstance(alignment, dict):
        return f"<h3>Alignment to the atlas</h3><p>{_e(verdict)}; no figures recorded.</p>"
    if alignment.get("skipped"):
        return "<h3>Alignment to the atlas</h3><p>Not needed: the scan is on the atlas grid.</p>"
    figures = (("brain overlap (Dice of brain masks)", "brain_overlap", 3),
               ("intensity correlation", "correlation", 3),
               ("mutual information", "mutual_information", 4), ("seconds", "seconds", 1))
    rows = [[(_e(label), "th"), (_number(alignment.get(key), digits), "num")]
            for label, key, digits in figures]
    rows.insert(0, [("verdict", "th"), f"<b>{_e(verdict)}</b>"])
    matrix = alignment.get("atlas_to_scan_world_ras")
    details = ""
    if isinstance(matrix, list) and matrix:
        matrix_rows = [[(_number(v, 4), "num") for v in row] for row in matrix
                       if isinstance(row, list)]
        details = ("<details><summary>atlas-to-scan affine (world RAS, mm)</summary>"
                   f"{_table(None, matrix_rows)}"
                   "</details>")
    return f"<h3>Alignment to the atlas</h3>{_table(None, rows)}{details}"


def _timings_and_refinement(record: dict) -> str:
    parts = []
    refinement = record.get("refinement")
    if isinstance(refinement, dict):
        start, end = refinement.get("loss_start"), refinement.get("loss")
        change = ""
        if _number(start) != "n/a" and _number(end) != "n/a" and start:
            change = f" ({100.0 * (end - start) / abs(start):+.1f}%)"
        parts.append(f"<h3>Refinement</h3><p>loss {_e(_number(start, 4))} &rarr; "
                     f"{_e(_number(end, 4))}{_e(change)}</p>")
    model = record.get("intensity_model")
    if isinstance(model, dict):
        text = (f"applied: {_number(100.0 * (model.get('changed_fraction') or 0.0), 2)}% of the "
                f"brain's voxels relabelled by the scan's intensities" if model.get("applied")
                else f"not applied ({model.get('warning')}): the label transfer's labels")
        parts.append(f"<h3>Intensity model</h3><p>{_e(text)}</p>")
    seconds = record.get("seconds")
    if isinstance(seconds, dict) and seconds:
        rows = [[_e(stage), (_number(value, 1), "num")] for stage, value in seconds.items()]
        parts.append(f"<h3>Seconds</h3>{_table(['stage', 's'], rows)}")
    return "".join(parts)


def _swatch(structure: str, colours: dict = None) -> str:
    """The structure's outline colour in the QC picture: the prediction's ``label_colours``
    (the user's names and colours), else the default (``qc.label_colour``)."""
    from ltnet_tf.reporting.qc import label_colour  # matplotlib only when a page is drawn

    if colours and isinstance(colours.get(structure), (list, tuple)):
        red, green, blue = (int(c) for c in colours[structure][:3])
        return f'<span class="swatch" style="background: rgb({red}, {green}, {blue})"></span>'

    label = _LABEL_IDS.get(structure)
    if label is None and structure.startswith("label ") and structure[6:].strip().isdigit():
        label = int(structure[6:])
    if label is None:
        return ""
    red, green, blue = label_colour(label)
    return f'<span class="swatch" style="background: rgb({red}, {green}, {blue})"></span>'


def _structures(record: dict, colours: dict = None) -> str:
    volumes = record.get("volumes_mm3") or {}
    dice = record.get("dice") or {}
    expected = _quality(record).get("structures") or {}
    if not volumes and not dice:
        return ""
    names = list(volumes) + [name for name in dice if name not in volumes]
    header = (["", "structure", "volume (mm&sup3;)"] + (["expected Dice"] if expected else [])
              + (["Dice", ""] if dice else []))
    rows = []
    for name in names:
        row = [_swatch(str(name), colours), _e(name), (_number(volumes.get(name), 1), "num")]
        if expected:
            row.append((_number(expected.get(name)), "num"))
        if dice:
            value = dice.get(name)
            width = int(round(80 * value)) if _number(value) != "n/a" else 0
            row += [(_number(value), "num"),
                    f'<span class="bar" style="width: {max(0, min(width, 80))}px"></span>']
        rows.append(row)
    title = "Structures" + (f" (mean Dice {_e(_number(record.get('mean_dice')))})"
                            if dice else "") + (
        f" (expected Dice {_e(_number(_quality(record).get('expected_dice')))})"
        if expected else "")
    return f"<h3>{title}</h3>{_table(header, rows)}"


def _scan_section(index: int, output_dir: str, entry, colours: dict = None) -> str:
    name, record, reasons = entry
    badge = (f'<span class="badge flagged">FLAGGED: {_e("; ".join(reasons))}</span>' if reasons
             else '<span class="badge">ok</span>')
    warnings = record.get("warnings") or []
    warning_box = ("<div class=\"warnings\">Warnings<ul>"
                   + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul></div>"
                   if warnings else "")
    paths = " &middot; ".join(f"{_e(key)}: {_e(record[key])}" for key in ("image", "output")
                              if record.get(key))
    left = _alignment(record) + _timings_and_refinement(record)
    return (f'<section class="scan{" flagged" if reasons else ""}" id="scan-{index}">'
            f"<h2>{_e(name)} {badge}</h2>{warning_box}"
            f'<div class="paths">{paths}</div>{_qc_picture(output_dir, name, record)}'
            f'<div class="columns"><div>{left}</div><div>{_structures(record, colours)}</div></div>'
            "</section>")


def render_report_html(output_dir: str, prediction: dict) -> str:
    """The page as a string (see ``write_report_html``)."""
    if not isinstance(prediction, dict):
        raise ValueError(f"{output_dir}: the prediction record is a {type(prediction).__name__}, "
                         "not a JSON object")
    entries = flagged_first(prediction)
    colours = prediction.get("label_colours") if isinstance(prediction.get("label_colours"),
                                                            dict) else None
    sections = "".join(_scan_section(i, output_dir, entry, colours)
                       for i, entry in enumerate(entries))
    title = f"ltnet-tf report: {len(entries)} scan{'s' if len(entries) != 1 else ''}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body>"
            f"{_header(prediction, entries)}{_summary(entries)}{sections}</body></html>\n")


def write_report_html(output_dir: str, prediction: dict, *, path=None) -> str:
    """Write the run's report page and return its path.

    Args:
        output_dir: the prediction folder; ``qc_png`` names in the record are relative to it.
        prediction: the record written as ``prediction.json`` (missing optional keys are shown as
            "n/a" or left out).
        path: where to write; default ``<output_dir>/report.html``.
    Writes one self-contained HTML file (QC pictures embedded), through a temporary file in the
    same folder and a rename, so it is never half-written. Raises ValueError when ``prediction``
    is not a dict, OSError when the folder cannot be written.
    """
    path = os.fspath(path) if path is not None else os.path.join(output_dir, "report.html")
    page = render_report_html(output_dir, prediction)
    with atomic_write(path, encoding="utf-8") as f:
        f.write(page)
    return path
