"""Users' structure names from training to every prediction output: train.py --label_names keeps
them in the run folder and the SavedModel's metadata; predict.py writes them into volumes.csv,
dice.csv, dice.json and prediction.json, from the run, from its own --label_names (overriding the
run's), or with atlases and no network. A bad label-name file stops a command before anything is
written. (The parsers themselves: tests/test_label_names.py.)"""
import csv
import json
import os
import subprocess
import sys

import pytest

from helpers import REPO, STEPS, SUBPROCESS_TIMEOUT, the_error_line, train_argv
from ltnet_tf.commands import cli
from ltnet_tf.io.label_names import LabelNames
from ltnet_tf.io.labels import structure_name
from ltnet_tf.serving.modeldir import ModelDir

pytestmark = pytest.mark.slow  # trains a run; predict.py in fresh processes (CI runs -m slow too)

# The synthetic atlas's IDs (ltnet_tf.commands.synthetic) under a lab's own names: a FreeSurfer colour table
# (names without spaces), with its colours.
CUSTOM = {2: "my-white-matter", 3: "my-cortex", 4: "my-ventricle-L", 10: "my-thalamus-L",
          11: "my-caudate-L", 17: "my-hippocampus-L", 43: "my-ventricle-R", 49: "my-thalamus-R",
          50: "my-caudate-R", 53: "my-hippocampus-R"}
CUSTOM_LUT = ("# our protocol\n#No. Label Name                R   G   B   A\n"
              "0   Unknown                       0   0   0   0\n"
              + "".join(f"{i:<3} {name:<28}  {i} {2 * i} {100 + i} 0\n"
                        for i, name in CUSTOM.items()))
# Another file for predict.py --label_names: ITK-SNAP's format, names with spaces and commas (the
# CSV files must quote them), and ID 2 left out (it falls back to FreeSurfer's name, with a
# warning).
OTHER = {3: "cortex, outer", 4: "ventricle (left)", 10: "thalamus L", 11: "caudate L",
         17: "hippocampus, left", 43: "ventricle (right)", 49: "thalamus R", 50: "caudate R",
         53: "hippocampus, right"}
OTHER_ITKSNAP = ("################################################\n"
                 "# ITK-SnAP Label Description File\n"
                 "################################################\n"
                 '    0     0    0    0        0  0  0    "Clear Label"\n'
                 + "".join(f'  {i:>3}   {i}  {i}  {i}     1  1  1    "{name}"\n'
                           for i, name in OTHER.items()))
# A BIDS dseg.tsv, for atlases without a run folder.
DSEG = {2: "White Matter", 3: "Gray Matter", 4: "Lateral Ventricle L", 10: "Thalamus L",
        11: "Caudate L", 17: "Hippocampus L", 43: "Lateral Ventricle R", 49: "Thalamus R",
        50: "Caudate R", 53: "Hippocampus R"}
DSEG_TSV = "index\tname\tabbreviation\n" + "".join(f"{i}\t{name}\tn/a\n"
                                                  for i, name in DSEG.items())


def write(folder, name, text) -> str:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def predict(*argv) -> int:
    return cli.predict_main(["predict.py", *argv])


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def check_tables(out, names: dict, label_ids):
    """volumes.csv's columns, dice.csv's structure column, dice.json's and prediction.json's names
    are ``names`` (ID -> name) for every foreground atlas ID, in ID order."""
    foreground = [i for i in label_ids if i != 0]
    header, *rows = read_csv(out / "volumes.csv")
    assert header == ["scan", *[names[i] for i in foreground], "labels_by"]
    assert {row[-1] for row in rows} <= {"label transfer", "label transfer + intensity model"}
    assert rows and all(len(row) == len(header) for row in rows)
    dice_rows = [row for row in read_csv(out / "dice.csv")[1:] if row[1] != "mean"]
    assert dice_rows and all(row[2] == names[int(row[1])] for row in dice_rows)
    assert {int(row[1]) for row in dice_rows} == set(foreground)
    report = json.loads((out / "dice.json").read_text())
    assert {int(k): v["name"] for k, v in report["structures"].items()} == \
        {i: names[i] for i in foreground}
    prediction = json.loads((out / "prediction.json").read_text())
    for scan in prediction["scans"].values():
        assert list(scan["volumes_mm3"]) == [names[i] for i in foreground]
        if "dice" in scan:
            assert set(scan["dice"]) == {names[i] for i in foreground}
    assert set(prediction["label_colours"]) == {names[i] for i in foreground}
    return prediction


@pytest.fixture(scope="module")
def label_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("label_files")
    return {"lut": write(folder, "our_protocol.lut", CUSTOM_LUT),
            "itksnap": write(folder, "labels.txt", OTHER_ITKSNAP),
            "dseg": write(folder, "atlas_dseg.tsv", DSEG_TSV),
            "malformed": write(folder, "broken.lut", CUSTOM_LUT.replace(
                "17  my-hippocampus-L", "17  my hippocampus L"))}


@pytest.fixture(scope="module")
def named_run(dataset, label_files, tmp_path_factory):
    """A run trained (STEPS steps, slim U-Net) with train.py --label_names (the FreeSurfer LUT)."""
    model_dir = tmp_path_factory.mktemp("named") / "run"
    assert cli.train_main(train_argv(dataset, model_dir, f"--steps={STEPS}",
                                     f"--checkpoint_every={STEPS}", "--label_names",
                                     label_files["lut"])) == 0
    return ModelDir(str(model_dir))


# ------------------------------------------------------------------------------- training
def test_the_run_folder_keeps_the_names(named_run, label_files):
    saved = LabelNames.load(named_run.label_names_path)
    assert dict(saved) == {0: "Unknown", **CUSTOM}
    assert saved.colour(17) == (17, 34, 117) and saved.source == label_files["lut"]
    assert named_run.load_label_names() == saved


def test_the_saved_model_metadata_has_the_names(named_run, dataset):
    metadata = named_run.saved_model_metadata()
    assert metadata["label_ids"] == dataset.label_ids
    assert metadata["structure_names"] == {"0": "Unknown",
                                           **{str(i): n for i, n in CUSTOM.items()}}
    labels = metadata["label_names"]["labels"]
    assert {int(k): v["name"] for k, v in labels.items()} == {0: "Unknown", **CUSTOM}
    assert labels["53"]["colour"] == [53, 106, 153]


# ------------------------------------------------------------------------------- prediction
def test_predict_writes_the_run_s_names(named_run, dataset, tmp_path):
    out = tmp_path / "out"
    assert predict("--model_dir", named_run.path, "--images", dataset.images_dir, "--labels",
                   dataset.labels_dir, "--output_dir", str(out), "--norefine") == 0
    prediction = check_tables(out, CUSTOM, dataset.label_ids)
    assert prediction["label_names"] == named_run.load_label_names().source
    assert prediction["label_colours"]["my-hippocampus-L"] == [17, 34, 117]
    assert prediction["producer"]["label_names"] == named_run.load_label_names().to_dict()


def test_predict_label_names_override_the_run_s(named_run, dataset, label_files, tmp_path,
                                                caplog):
    """--label_names wins over the run's file; an ID it leaves out gets FreeSurfer's name, with a
    warning naming it. Names with commas survive the CSV files."""
    out = tmp_path / "out"
    caplog.set_level("WARNING")
    assert predict("--model_dir", named_run.path, "--images", dataset.images_dir, "--labels",
                   dataset.labels_dir, "--output_dir", str(out), "--norefine", "--label_names",
                   label_files["itksnap"]) == 0
    expected = {**OTHER, 2: structure_name(2)}
    prediction = check_tables(out, expected, dataset.label_ids)
    assert prediction["label_names"] == label_files["itksnap"]
    assert not any(name in (out / "volumes.csv").read_text() for name in CUSTOM.values())
    assert '"hippocampus, left"' in (out / "volumes.csv").read_text()  # quoted, one column
    warning = next(r.getMessage() for r in caplog.records
                   if "does not name 1 label(s)" in r.getMessage())
    assert label_files["itksnap"] in warning and "FreeSurfer's names for 2" in warning


def test_predict_with_atlases_and_label_names_in_a_real_process(dataset, label_files, tmp_path):
    """No run folder: predict.py --atlas ... --label_names dseg.tsv, as a process."""
    out = tmp_path / "out"
    process = subprocess.run(
        [sys.executable, os.path.join(REPO, "predict.py"), "--atlas", dataset.atlas,
         "--atlas_labels", dataset.atlas_labels, "--label_names", label_files["dseg"],
         "--images", dataset.images[0], "--labels", dataset.labels_dir, "--output_dir", str(out),
         "--refine_steps=2", "--refine_coarse_steps=3", "--noqc"],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, process.stderr
    prediction = check_tables(out, DSEG, dataset.label_ids)
    assert prediction["label_names"] == label_files["dseg"] and prediction["network"] is False


def test_without_label_names_the_tables_keep_freesurfer_s_names(trained_run, dataset, tmp_path):
    out = tmp_path / "out"
    assert predict("--model_dir", trained_run.path, "--images", dataset.images[0], "--labels",
                   dataset.labels_dir, "--output_dir", str(out), "--norefine") == 0
    prediction = check_tables(out, {i: structure_name(i) for i in dataset.label_ids},
                              dataset.label_ids)
    assert prediction["label_names"] == "FreeSurfer"


# ------------------------------------------------------------------------------- bad files
def test_a_malformed_label_file_stops_predict_before_anything_is_written(
        trained_run, dataset, label_files, tmp_path, capsys):
    for source in (["--model_dir", trained_run.path],
                   ["--atlas", dataset.atlas, "--atlas_labels", dataset.atlas_labels]):
        out = tmp_path / "out"
        assert predict(*source, "--images", dataset.images_dir, "--output_dir", str(out),
                       "--label_names", label_files["malformed"]) == 1
        the_error_line(capsys, label_files["malformed"], "line 9", "fields")
        assert not out.exists()


def test_a_malformed_label_file_stops_training_before_the_run_folder_is_made(
        dataset, label_files, tmp_path, capsys):
    model_dir = tmp_path / "run"
    assert cli.train_main(train_argv(dataset, model_dir, "--steps=1", "--label_names",
                                     label_files["malformed"])) == 1
    the_error_line(capsys, label_files["malformed"], "line 9")
    assert not model_dir.exists()


def test_names_that_would_call_two_structures_alike_are_refused(dataset, tmp_path, capsys):
    """A file that calls ID 2 'Left-Hippocampus' but does not name 17, which FreeSurfer calls so:
    the two columns of volumes.csv could not be told apart."""
    clash = write(tmp_path, "clash.lut", "2 Left-Hippocampus 1 2 3 0\n")
    out = tmp_path / "out"
    assert predict("--atlas", dataset.atlas, "--atlas_labels", dataset.atlas_labels, "--images",
                   dataset.images_dir, "--output_dir", str(out), "--label_names", clash) == 1
    the_error_line(capsys, "labels 2 and 17", "'Left-Hippocampus'", clash)
    assert not out.exists()
