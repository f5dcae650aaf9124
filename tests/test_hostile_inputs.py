"""Input from other labs stays inert: names in report.html are text, a run folder is data.

- a real predict.py run whose scan file name and structure names (a BIDS dseg.tsv) carry HTML and
  script: report.html shows them as text;
- run folders with a malformed config.json, a config naming a file, a checkpoint record or an
  atlas link pointing outside the folder: one line naming the problem, nothing read from outside;
- the package never unpickles, never loads Keras models from files (no Lambda layers to run):
  what it reads from a run folder is JSON, NIfTI, TensorFlow checkpoints and SavedModels (graphs
  of TensorFlow ops, no Python code).
"""
import glob
import os
import re
import shutil

import nibabel as nib
import pytest

from helpers import REPO, the_error_line
from ltnet_tf.commands import cli
from ltnet_tf.config import LTNetConfig

SCRIPT = "<script>alert(1)</script>"
IMAGE_TAG = "<img src=x onerror=alert(2)>"


def test_hostile_scan_and_structure_names_are_text_in_the_report(dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(dataset.images[0], images / f"sub{IMAGE_TAG}.nii.gz")
    foreground = [i for i in dataset.label_ids if i != 0]
    names = tmp_path / "dseg.tsv"
    names.write_text("index\tname\n" + "".join(
        f"{i}\t{SCRIPT if k == 0 else f'structure {i} <b>bold</b>'}\n"
        for k, i in enumerate(foreground)))
    output = tmp_path / "out"
    assert cli.predict_main(["predict.py", "--atlas", dataset.atlas, "--atlas_labels",
                             dataset.atlas_labels, "--images", str(images), "--output_dir",
                             str(output), "--label_names", str(names)]) == 0
    page = (output / "report.html").read_text()
    assert "<script" not in page and "<img src=x" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "sub&lt;img src=x onerror=alert(2)&gt;" in page
    with open(output / "volumes.csv") as f:
        assert SCRIPT in f.readline()  # the table keeps the name as given: it is not HTML


# ------------------------------------------------------------------------------- run folders
def run_folder(dataset, tmp_path, config_text=None):
    """A run folder with the atlas and ``config_text`` (default: a valid config) as config.json."""
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(dataset.atlas, folder / "atlas.nii.gz")
    shutil.copy(dataset.atlas_labels, folder / "atlas_labels.nii.gz")
    if config_text is None:
        shape = list(nib.load(dataset.atlas).shape)
        LTNetConfig().replace(atlas_shape=shape, label_ids=[int(i) for i in dataset.label_ids]) \
            .save(str(folder / "config.json"))
    else:
        (folder / "config.json").write_text(config_text)
    return folder


def predict_with(dataset, folder, tmp_path):
    return cli.predict_main(["predict.py", "--model_dir", str(folder), "--images",
                             dataset.images[0], "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("config_text, fragment", [
    ('{"steps": 3,', "config.json: not valid JSON"),
    ("[1, 2]", "config.json: expected a JSON object of config fields"),
    ('{"atlas_path": "/etc/passwd"}', "config.json: unknown config field(s): atlas_path"),
    ('{"steps": "__import__(\'os\').system(\'touch pwned\')"}', "config.json"),
])
def test_malformed_config_is_refused_in_one_line(dataset, tmp_path, capsys, config_text,
                                                 fragment):
    folder = run_folder(dataset, tmp_path, config_text)
    assert predict_with(dataset, folder, tmp_path) == 1
    the_error_line(capsys, fragment)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists("pwned")


def test_a_checkpoint_record_naming_a_file_elsewhere_is_refused(dataset, tmp_path, capsys):
    folder = run_folder(dataset, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for suffix in (".index", ".data-00000-of-00001"):
        (elsewhere / f"ckpt-1{suffix}").write_bytes(b"not read")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "checkpoint").write_text(
        f'model_checkpoint_path: "{elsewhere}/ckpt-1"\n'
        f'all_model_checkpoint_paths: "{elsewhere}/ckpt-1"\n')
    assert predict_with(dataset, folder, tmp_path) == 1
    the_error_line(capsys, "its checkpoint record names", "outside the run folder; refused")


def test_an_atlas_linked_from_elsewhere_is_refused(dataset, tmp_path, capsys):
    folder = run_folder(dataset, tmp_path)
    os.remove(folder / "atlas_labels.nii.gz")
    os.symlink(dataset.atlas_labels, folder / "atlas_labels.nii.gz")
    assert predict_with(dataset, folder, tmp_path) == 1
    the_error_line(capsys, "atlas_labels.nii.gz names", "outside the run folder")


def test_the_package_never_runs_code_from_files():
    """No unpickling, no Keras model files (whose Lambda layers would run code): a run folder is
    read as JSON, NIfTI, checkpoints (tensors) and SavedModels (TensorFlow graphs)."""
    forbidden = re.compile(r"\bpickle\b|allow_pickle\s*=\s*True|load_model\(|\bLambda\(|"
                           r"\beval\(|\bexec\(|yaml\.load\(|model_from_(json|yaml)\(")
    # --jobs N hands job 1's request to the jobs it spawned through a pipe (bytes made by this
    # run's own process, never read from a file): the one place the package unpickles.
    between_processes = {"ltnet_tf/prediction/jobs.py": {
        "import pickle", "payload = pickle.dumps((self.request, key, share))",
        "request, key, pairs = pickle.loads(payload)"}}
    found = []
    for path in glob.glob(os.path.join(REPO, "ltnet_tf", "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, REPO)
        with open(path) as f:
            for number, line in enumerate(f, start=1):
                code = line.split("#", 1)[0]
                if forbidden.search(code) and \
                        code.strip() not in between_processes.get(relative, ()):
                    found.append(f"{relative}:{number}: {line.strip()}")
    assert found == []
    # ...and the check itself finds what it looks for.
    assert forbidden.search("values = np.load(path, allow_pickle=True)")
    assert forbidden.search("model = tf.keras.models.load_model(path)")
