"""Users' label names (ltnet_tf.io.label_names, ltnet_tf.io.label_files): the three file formats as their
tools write them, detection by content, every refusal, JSON round trips, the FreeSurfer fallback and
the coverage warnings."""
import csv
import gzip
import io
import json
import logging
import os

import numpy as np
import pytest

from ltnet_tf.io import labels
from ltnet_tf.io.label_names import LabelNames, fallback_colour
from ltnet_tf.io.volumes import DataError

# As FreeSurfer lays out FreeSurferColorLUT.txt: an $Id line, a column comment, blank lines between
# sections, names padded with runs of spaces; plus a row with tabs and one indented with trailing
# blanks, as hand-edited tables have.
FREESURFER_LUT = """#$Id: FreeSurferColorLUT.txt,v 1.105 2015/07/29 18:23:03 greve Exp $

#No. Label Name:                            R   G   B   A

0   Unknown                                 0   0   0   0
17  Left-Hippocampus                        220 216 20  0

# Hippocampal subfields of our protocol
203 parasubiculum                           175 175 75  0
206\tCA1\t255\t0\t0\t0
  208   CA3     0   128 0   0   \n"""

# As ITK-SNAP's ColorLabelTable::SaveToFile writes it (header block, fixed "Clear Label" row 0,
# alpha printed with two significant digits).
ITKSNAP_FILE = """################################################
# ITK-SnAP Label Description File
# File format: 
# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL
# Fields: 
#    IDX:   Zero-based index 
#    -R-:   Red color component (0..255)
#    -G-:   Green color component (0..255)
#    -B-:   Blue color component (0..255)
#    -A-:   Label transparency (0.00 .. 1.00)
#    VIS:   Label visibility (0 or 1)
#    IDX:   Label mesh visibility (0 or 1)
#  LABEL:   Label description 
################################################
    0     0    0    0        0  0  0    "Clear Label"
    1   252    1    7        1  1  1    "Inner ERC/CS"
    2     0  255    0      0.5  1  0    "Outer SUB/ERC"
  101    32  255  255        1  0  0    "CA1, left"
"""

# The two examples of the BIDS specification ("Common image-derived labels").
DSEG_WITH_COLOR = ("index\tname\tabbreviation\tcolor\tmapping\n"
                   "100\tGray Matter\tGM\t#ff53bb\t1\n"
                   "101\tWhite Matter\tWM\t#2f8bbe\t2\n"
                   "102\tBrainstem\tBS\t#36de72\t11\n")
DSEG_WITHOUT_COLOR = ("index\tname\tabbreviation\n"
                      "137\tpars opercularis\tIFGop\n"
                      "138\tpars triangularis\tIFGtr\n"
                      "139\tpars orbitalis\tIFGor\n")


def write(tmp_path, name, text, newline="\n"):
    path = tmp_path / name
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)
    return str(path)


def refusal(path):
    with pytest.raises(DataError) as caught:
        LabelNames.from_file(path)
    message = str(caught.value)
    assert "\n" not in message and os.path.basename(path) in message, message
    return message


# ----------------------------------------------------------------------------------------- formats
def test_freesurfer_lut_with_comments_blank_lines_tabs_and_runs_of_spaces(tmp_path):
    path = write(tmp_path, "FreeSurferColorLUT.txt", FREESURFER_LUT)
    names = LabelNames.from_file(path)
    assert dict(names) == {0: "Unknown", 17: "Left-Hippocampus", 203: "parasubiculum", 206: "CA1",
                           208: "CA3"}
    assert names.colour(203) == (175, 175, 75) and names.colour(206) == (255, 0, 0)
    assert names.colour(208) == (0, 128, 0)
    assert names.source == path


def test_freesurfer_lut_saved_on_windows(tmp_path):
    """CRLF line ends (as in the LUT that MNE-Python ships) and a UTF-8 byte-order mark."""
    path = write(tmp_path, "lut.txt", "\ufeff" + FREESURFER_LUT, newline="\r\n")
    with open(path, "rb") as f:
        raw = f.read()
    assert raw.startswith(b"\xef\xbb\xbf#$Id") and b"0   0\r\n17" in raw
    windows = LabelNames.from_file(path)
    unix = LabelNames.from_file(write(tmp_path, "unix.txt", FREESURFER_LUT))
    assert dict(windows) == dict(unix)
    assert {i: windows.colour(i) for i in windows} == {i: unix.colour(i) for i in unix}


def test_itksnap_file_as_itksnap_writes_it(tmp_path):
    path = write(tmp_path, "subfields_labels.txt", ITKSNAP_FILE)
    names = LabelNames.from_file(path)
    assert dict(names) == {1: "Inner ERC/CS", 2: "Outer SUB/ERC", 101: "CA1, left"}
    assert names.colour(1) == (252, 1, 7) and names.colour(101) == (32, 255, 255)
    # ITK-SNAP's fixed "Clear Label" row is ignored (as ITK-SNAP does): 0 keeps its usual name.
    assert 0 not in names and names.name(0) == "background"


def test_dseg_tsv_with_color_column(tmp_path):
    names = LabelNames.from_file(write(tmp_path, "dseg.tsv", DSEG_WITH_COLOR))
    assert dict(names) == {100: "Gray Matter", 101: "White Matter", 102: "Brainstem"}
    assert names.colour(100) == (0xFF, 0x53, 0xBB) and names.colour(102) == (0x36, 0xDE, 0x72)


def test_dseg_tsv_without_color_column_or_with_na_colours(tmp_path):
    names = LabelNames.from_file(write(tmp_path, "atlas_dseg.tsv", DSEG_WITHOUT_COLOR))
    assert dict(names) == {137: "pars opercularis", 138: "pars triangularis", 139: "pars orbitalis"}
    assert names.colour(137) == fallback_colour(137)
    with_na = write(tmp_path, "na.tsv", "index\tname\tcolor\n905\tCA1\tn/a\n906\t\"CA2 and 3\"\t\n"
                    "5\tCA4\tn/a\n")
    names = LabelNames.from_file(with_na)
    assert dict(names) == {905: "CA1", 906: "CA2 and 3", 5: "CA4"}  # early BIDS examples quoted
    assert names.colour(905) == fallback_colour(905) and names.colour(906) == fallback_colour(906)
    assert names.colour(5) == labels.FREESURFER_COLOURS[5]  # an aseg ID: FreeSurfer's colour


@pytest.mark.parametrize("text, misleading_name, expected", [
    (FREESURFER_LUT, "labels.tsv", "CA1"),
    (ITKSNAP_FILE, "FreeSurferColorLUT.txt", "Inner ERC/CS"),
    (DSEG_WITH_COLOR, "itksnap_labels.txt", "Gray Matter"),
    (DSEG_WITHOUT_COLOR, "names.lut", "pars opercularis"),
])
def test_format_is_told_by_content_not_extension(tmp_path, text, misleading_name, expected):
    names = LabelNames.from_file(write(tmp_path, misleading_name, text))
    assert expected in names.values()


def test_itksnap_file_without_its_header_is_recognised_by_its_quoted_names(tmp_path):
    names = LabelNames.from_file(write(tmp_path, "x.txt", '  7  10 20 30  1 1 1 "Left CA1"\n'))
    assert dict(names) == {7: "Left CA1"} and names.colour(7) == (10, 20, 30)


# ----------------------------------------------------------------------------------------- refusals
LUT_HEAD = "#No. Label Name: R G B A\n"
ITK_HEAD = "# ITK-SnAP Label Description File\n"
DSEG_HEAD = "index\tname\tcolor\n"


@pytest.mark.parametrize("text, expected", [
    ("", "empty"),
    ("\n  \n\n", "empty"),
    ("# nothing but\n# comments\n", "only comments"),
    ("hello world\n", "line 1: not a label-name file; expected a FreeSurfer colour table"),
    (LUT_HEAD + "17 Left Hippocampus 220 216 20 0\n", "line 2: 7 fields"),
    (LUT_HEAD + "17 Left-Hippocampus 220 216 20\n", "line 2: 5 fields"),
    (LUT_HEAD + "2 A 1 1 1 0\n17.5 Left-Hippocampus 220 216 20 0\n", "line 3: label ID '17.5'"),
    (LUT_HEAD + "2 A 1 1 1 0\n-1 Left-Hippocampus 220 216 20 0\n", "line 3: label ID '-1'"),
    (LUT_HEAD + "17 Left-Hippocampus 300 216 20 0\n", "line 2: colour value '300'"),
    (LUT_HEAD + "17 A 1 1 1 0\n\n17 B 1 1 1 0\n", "line 4: label 17 is named again (first on "
                                                 "line 2)"),
    (LUT_HEAD + "17 A 1 1 1 0\n53 A 1 1 1 0\n", "line 3: name 'A' of label 53 is already label "
                                              "17's"),
    (ITK_HEAD + "1 255 0 0 1 1 1 CA1\n", "line 2: not an ITK-SNAP label description file row"),
    (ITK_HEAD + '1 255 0 0 2 1 1 "CA1"\n', "line 2: alpha '2'"),
    (ITK_HEAD + '1 255 0 0 1 1 1 "CA1"\n2 0 255 0 1 1 1 "CA1"\n', "line 3: name 'CA1' of label 2"),
    (ITK_HEAD + '1 255 0 0 1 1 1 "CA1\tleft"\n', "line 2: name 'CA1\\tleft' contains a line break"),
    (ITK_HEAD + '1 255 0 0 1 1 1 "   "\n', "line 2: empty name"),
    (ITK_HEAD + '0 0 0 0 0 0 0 "Clear Label"\n', "names no labels"),
    ("index name color\n1 CA1 #ff0000\n", "line 1: looks like a BIDS dseg.tsv header"),
    (DSEG_HEAD + "1\tCA1\n", "line 2: 2 tab-separated fields where the header has 3"),
    (DSEG_HEAD + "one\tCA1\t#ff0000\n", "line 2: label ID 'one'"),
    (DSEG_HEAD + "1\tCA1\tred\n", "line 2: color 'red' is not #rrggbb"),
    (DSEG_HEAD + "1\tn/a\t#ff0000\n", "line 2: label 1 has no name"),
    (DSEG_HEAD + "1\tCA1\tn/a\n1\tCA3\tn/a\n", "line 3: label 1 is named again"),
    (DSEG_HEAD + "1\tCA1\tn/a\n2\tCA1\tn/a\n", "line 3: name 'CA1' of label 2"),
    ("index\tname\tname\n1\tA\tB\n", "line 1: column 'name' appears twice"),
    ("index\tlabel\tcolor\n1\tA\t#ff0000\n", "line 1: a BIDS dseg.tsv header without the required "
                                             "column 'name'"),
    (DSEG_HEAD, "names no labels"),
])
def test_malformed_files_are_refused_in_one_line_naming_file_and_line(tmp_path, text, expected):
    message = refusal(write(tmp_path, "my_labels.txt", text))
    assert expected in message, message


def test_unreadable_inputs_are_refused(tmp_path):
    assert "not found" in refusal(str(tmp_path / "missing_labels.txt"))
    (tmp_path / "labels_dir").mkdir()
    assert "is a directory" in refusal(str(tmp_path / "labels_dir"))
    image = tmp_path / "atlas_labels.nii.gz"  # the label image given by mistake
    image.write_bytes(gzip.compress(np.arange(1000, dtype=np.int16).tobytes()))
    assert "not a text file" in refusal(str(image))


def test_names_with_line_breaks_or_control_characters_are_refused_from_any_source():
    for bad in ("CA1\nleft", "CA1\rleft", "CA1\x0cleft", "CA1\u2028left", "", " CA1"):
        with pytest.raises(DataError):
            LabelNames({1: bad}, source="test")
        with pytest.raises(DataError, match="saved.json"):
            LabelNames.from_dict({"labels": {"1": {"name": bad}}}, origin="saved.json")


def test_commas_and_quotes_in_names_survive_a_csv_header(tmp_path):
    text = DSEG_HEAD + '1\tCornu Ammonis, field 1\t#ff0000\n2\tthe "tail"\tn/a\n'
    names = LabelNames.from_file(write(tmp_path, "dseg.tsv", text))
    header = ["scan", *[names.name(i) for i in (1, 2)]]
    buffer = io.StringIO()
    csv.writer(buffer).writerow(header)
    assert next(csv.reader(io.StringIO(buffer.getvalue()))) == header


# --------------------------------------------------------------------------------------------- JSON
def test_json_round_trip_through_a_file(tmp_path):
    names = LabelNames.from_file(write(tmp_path, "lut.txt", FREESURFER_LUT))
    saved = names.save(str(tmp_path / "label_names.json"))
    assert set(os.listdir(tmp_path)) == {"lut.txt", "label_names.json"}  # no temporary left
    loaded = LabelNames.load(saved)
    assert loaded == names and loaded.source == names.source
    assert {i: loaded.colour(i) for i in loaded} == {i: names.colour(i) for i in names}
    as_json = json.loads(json.dumps(names.to_dict()))
    assert LabelNames.from_dict(as_json) == names
    assert as_json["labels"]["206"] == {"name": "CA1", "colour": [255, 0, 0]}


def test_json_round_trip_keeps_names_without_colours(tmp_path):
    names = LabelNames({5: "CA1", 6: "CA2"}, {5: (1, 2, 3)}, source="mine")
    assert names.to_dict() == {"source": "mine",
                               "labels": {"5": {"name": "CA1", "colour": [1, 2, 3]},
                                          "6": {"name": "CA2"}}}
    loaded = LabelNames.load(names.save(str(tmp_path / "n.json")))
    assert loaded == names and loaded.colour(6) == fallback_colour(6)


@pytest.mark.parametrize("content, expected", [
    ("{not json", "cannot read saved label names"),
    ('["a list"]', "not saved label names"),
    ('{"labels": {"1": "CA1"}}', "label 1: expected an object with a 'name'"),
    ('{"labels": {"x": {"name": "CA1"}}}', "label ID 'x'"),
    ('{"labels": {"1": {"name": "CA1", "colour": [300, 0, 0]}}}', "colour [300, 0, 0]"),
    ('{"labels": {"1": {"name": "CA1"}, "2": {"name": "CA1"}}}', "both called 'CA1'"),
    ('{"labels": {"1": {"name": "CA1"}, "01": {"name": "CA3"}}}', "label 1 is named twice"),
])
def test_bad_saved_names_are_refused_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "label_names.json"
    path.write_text(content)
    with pytest.raises(DataError) as caught:
        LabelNames.load(str(path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and expected in message, message
    with pytest.raises(DataError, match="not found"):
        LabelNames.load(str(tmp_path / "absent.json"))


# ----------------------------------------------------------------------------------------- fallback
def test_freesurfer_default_keeps_todays_names_exactly():
    default = LabelNames.freesurfer()
    assert default.source == "FreeSurfer"
    for label_id in range(0, 3000):
        assert default.name(label_id) == labels.structure_name(label_id)
    assert default.name(np.int32(53)) == "Right-Hippocampus"
    assert {i: default.colour(i) for i in labels.FREESURFER_NAMES} == labels.FREESURFER_COLOURS


def test_user_names_fall_back_to_freesurfer_then_to_label_id(tmp_path):
    names = LabelNames.from_file(write(tmp_path, "dseg.tsv", DSEG_WITHOUT_COLOR))
    assert names.name(137) == "pars opercularis"
    assert names.name(17) == "Left-Hippocampus" and names.colour(17) == (220, 216, 20)
    assert names.name(1001) == "label 1001" and names.colour(1001) == fallback_colour(1001)
    assert names[137] == "pars opercularis" and list(names) == [137, 138, 139] and len(names) == 3
    with pytest.raises(KeyError):
        names[17]  # the mapping holds only what the file names


def test_generated_colours_are_deterministic_distinct_and_valid():
    colours = [fallback_colour(i) for i in range(1, 101)]
    assert colours == [fallback_colour(i) for i in range(1, 101)]
    assert len(set(colours)) == 100
    assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
               for c in colours)
    # Consecutive IDs (a custom atlas's numbering) are far apart in colour, not shades of one hue.
    assert min(np.abs(np.subtract(a, b)).sum() for a, b in zip(colours, colours[1:])) > 60


def test_label_names_are_immutable():
    source = {1: "CA1"}
    names = LabelNames(source, {1: (1, 2, 3)}, source="mine")
    source[1] = "changed"
    assert names.name(1) == "CA1"
    with pytest.raises(AttributeError):
        names._names = {}
    with pytest.raises(TypeError):
        names[1] = "x"
    with pytest.raises(TypeError):
        names._names[1] = "x"
    assert hash(names) == hash(LabelNames({1: "CA1"}, {1: (1, 2, 3)}, source="mine"))


# ---------------------------------------------------------------------------------------- coverage
def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_check_covers_warns_about_unnamed_atlas_ids_and_unused_names(tmp_path, caplog):
    path = write(tmp_path, "subfields.txt", ITKSNAP_FILE)  # names 1, 2, 101
    names = LabelNames.from_file(path)
    with caplog.at_level(logging.WARNING):
        names.check_covers(np.array([0, 1, 2, 17, 1001]), "atlas labels atlas_labels.nii.gz")
    unnamed, unused = warnings_of(caplog)
    assert path in unnamed
    assert "does not name 2 label(s) of atlas labels atlas_labels.nii.gz" in unnamed
    assert "FreeSurfer's names for 17" in unnamed and "'label <id>' for 1001" in unnamed
    assert path in unused and "names 1 label(s)" in unused and "(ignored): 101" in unused


def test_check_covers_is_silent_when_names_fit(tmp_path, caplog):
    names = LabelNames.from_file(write(tmp_path, "dseg.tsv", DSEG_WITH_COLOR))
    with caplog.at_level(logging.WARNING):
        names.check_covers([0, 100, 101, 102], "atlas")
        LabelNames.freesurfer().check_covers([0, *labels.BENCHMARK_LABELS], "an aseg atlas")
    assert warnings_of(caplog) == []


def test_check_covers_names_ids_freesurfer_does_not_know(caplog):
    with caplog.at_level(logging.WARNING):
        LabelNames.freesurfer().check_covers(list(range(0, 30)) + [1001], "atlas")
    (message,) = warnings_of(caplog)
    assert message.startswith("FreeSurfer does not name") and "1001" in message


def test_check_covers_refuses_two_atlas_ids_under_one_name(caplog):
    names = LabelNames({1001: "Left-Hippocampus"}, source="mine.tsv")
    with pytest.raises(DataError,
                       match="labels 17 and 1001 would both be called 'Left-Hippocampus'"):
        names.check_covers([17, 1001], "atlas labels a.nii.gz")


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "label_names.json")
    LabelNames({1: "CA1"}, source="old").save(path)

    def write_half_then_fail(data, f, **kwargs):
        f.write('{"source": "new", "lab')
        raise OSError("disk full")

    monkeypatch.setattr(json, "dump", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        LabelNames({2: "CA3"}, source="new").save(path)
    monkeypatch.undo()
    assert LabelNames.load(path) == LabelNames({1: "CA1"}, source="old")
    assert os.listdir(tmp_path) == ["label_names.json"]
