"""report.html: parsed back with html.parser; pictures embedded; flagged scans first; escaping."""
import base64
import html.parser
import json
import os

import matplotlib.image
import numpy as np
import pytest

from ltnet_tf.reporting import report

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
HOSTILE = "sub-<script>alert(1)</script>&\"x\""


class Page(html.parser.HTMLParser):
    """Checks that every element is closed in order; collects what the tests look at."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.open, self.errors, self.tags, self.images, self.links = [], [], [], [], []
        self.ids, self.text, self.doctype = [], [], None
        self.feed(text)
        self.close()
        if self.open:
            self.errors.append(f"never closed: {self.open}")

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attributes.get("src", ""))
        if tag == "a" and "href" in attributes:
            self.links.append(attributes["href"])
        if "id" in attributes:
            self.ids.append(attributes["id"])
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.open.pop()

    def handle_endtag(self, tag):
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data):
        self.text.append(data)


def scan_record(qc_png=None, *, ok=True, warnings=(), dice=True):
    record = {"image": "/data/scan.nii.gz", "output": "/out/scan_seg.nii.gz",
              "alignment": {"brain_overlap": 0.95 if ok else 0.7, "correlation": 0.7,
                            "mutual_information": 0.61, "seconds": 0.8, "skipped": False,
                            "atlas_to_scan_world_ras": np.eye(4).tolist()},
              "alignment_ok": ok, "seconds": {"align": 0.8, "network": 2.0, "total": 3.1},
              "refinement": {"loss_start": -0.40, "loss": -0.45},
              "volumes_mm3": {"Left-Hippocampus": 4012.0, "Right-Hippocampus": 3987.5},
              "warnings": list(warnings)}
    if dice:
        record.update(dice={"Left-Hippocampus": 0.81, "Right-Hippocampus": None}, mean_dice=0.81)
    if qc_png:
        record["qc_png"] = qc_png
    return record


@pytest.fixture
def run(tmp_path):
    """An output folder with two QC pictures and a prediction record of four scans."""
    rng = np.random.default_rng(0)
    for name in ("a_qc.png", "b_qc.png"):
        matplotlib.image.imsave(tmp_path / name, rng.random((20, 30)), cmap="gray")
    prediction = {
        "model_dir": "/models/run <1>", "source": "checkpoint",
        "atlases": [{"image": "atlas.nii.gz", "labels": "atlas_labels.nii.gz"}],
        "fusion": None, "refinement": {"steps": 25, "factor": 2}, "align": "auto",
        "alignment_failed": ["bad-alignment"], "mean_dice": 0.8,
        "scans": {"fine-1": scan_record("a_qc.png"),
                  "bad-alignment": scan_record("b_qc.png", ok=False),
                  "fine-2": scan_record(dice=False),
                  HOSTILE: scan_record(warnings=["volume of <b>Left-Hippocampus</b> is odd"])}}
    return tmp_path, prediction


def test_page_is_well_formed_and_self_contained(run):
    folder, prediction = run
    path = report.write_report_html(str(folder), prediction)
    assert path == os.path.join(str(folder), "report.html")
    page = Page(open(path, encoding="utf-8").read())
    assert page.errors == [] and page.doctype.lower() == "doctype html"
    assert "script" not in page.tags and "link" not in page.tags
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert all(link.startswith("#") and link[1:] in page.ids for link in page.links)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_pictures_are_embedded_byte_for_byte(run):
    folder, prediction = run
    page = Page(report.render_report_html(str(folder), prediction))
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    on_disk = [(folder / name).read_bytes() for name in ("b_qc.png", "a_qc.png")]
    assert embedded == on_disk  # in page order: the flagged scan first


def test_flagged_scans_come_first(run):
    folder, prediction = run
    page = Page(report.render_report_html(str(folder), prediction))
    text = "\n".join(page.text)
    positions = {name: text.index(name) for name in ("bad-alignment", HOSTILE, "fine-1", "fine-2")}
    assert max(positions["bad-alignment"], positions[HOSTILE]) < min(positions["fine-1"],
                                                                     positions["fine-2"])
    assert text.count("FLAGGED") >= 4  # two in the summary, two section badges
    assert "alignment looks wrong" in text and "1 warning" in text
    assert "volume of <b>Left-Hippocampus</b> is odd" in text  # the warning, shown as text


def test_scans_are_sorted_worst_expected_dice_first_with_their_low_structures(run):
    """Within the flagged and the unflagged scans, the lowest expected Dice first; a scan below
    --min_quality is flagged; the summary names each scan's lowest structures."""
    folder, prediction = run

    def quality(value, below=False):
        return {"expected_dice": value, "min_quality": 0.7, "below_min_quality": below,
                "structures": {"Left-Hippocampus": value - 0.1, "Right-Hippocampus": value},
                "low": [{"structure": "Left-Hippocampus", "expected_dice": value - 0.1}]}

    scans = prediction["scans"]
    scans["fine-1"]["quality"], scans["fine-2"]["quality"] = quality(0.81), quality(0.74)
    scans["bad-alignment"]["quality"], scans[HOSTILE]["quality"] = quality(0.3, True), quality(0.6)
    prediction["quality"], prediction["quality_flagged"] = {"min_quality": 0.7}, ["bad-alignment"]
    page = Page(report.render_report_html(str(folder), prediction))
    text = "\n".join(page.text)
    order = sorted(("bad-alignment", HOSTILE, "fine-1", "fine-2"), key=text.index)
    assert order == ["bad-alignment", HOSTILE, "fine-2", "fine-1"]
    assert "expected Dice 0.30 below 0.70" in text and "Left-Hippocampus 0.64" in text
    assert "expected Dice below 0.70 flagged: 1 scan" in text


def test_user_strings_are_escaped(run):
    folder, prediction = run
    source = report.render_report_html(str(folder), prediction)
    assert "<script>" not in source and "<b>Left" not in source
    assert "sub-&lt;script&gt;alert(1)&lt;/script&gt;&amp;&quot;x&quot;" in source
    assert "/models/run &lt;1&gt;" in source
    assert HOSTILE in "\n".join(Page(source).text)


@pytest.mark.parametrize("prediction", [
    {},
    {"scans": {}},
    {"scans": {"only": {}}},
    {"atlas": "atlas.nii.gz", "scans": {"x": {"alignment": None, "seconds": None,
                                               "volumes_mm3": None, "dice": {"a": None}}}},
    {"model_dir": None, "scans": {"x": {"qc_png": "missing.png", "mean_dice": float("nan"),
                                        "alignment": {"skipped": True}}}},
])
def test_missing_optional_keys_are_tolerated(tmp_path, prediction):
    path = report.write_report_html(str(tmp_path), prediction, path=str(tmp_path / "r.html"))
    page = Page(open(path, encoding="utf-8").read())
    assert page.errors == []
    assert "ltnet_tf" in "".join(page.text)  # the header says what wrote the page


def test_missing_picture_and_no_network_are_said(tmp_path):
    prediction = {"model_dir": None, "atlas": "atlas.nii.gz",
                  "scans": {"x": {"qc_png": "missing.png", "alignment_ok": True}}}
    text = "".join(Page(report.render_report_html(str(tmp_path), prediction)).text)
    assert "QC picture missing.png could not be read" in text
    assert "no network" in text and "atlas.nii.gz" in text


def test_a_real_prediction_json_round_trip(run):
    """The record as predict.py writes it: through JSON (no NaN, lists not tuples)."""
    folder, prediction = run
    (folder / "prediction.json").write_text(json.dumps(prediction))
    loaded = json.loads((folder / "prediction.json").read_text())
    assert Page(report.render_report_html(str(folder), loaded)).errors == []


def test_not_a_record_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a JSON object"):
        report.write_report_html(str(tmp_path), ["scans"])
    assert list(tmp_path.iterdir()) == []
