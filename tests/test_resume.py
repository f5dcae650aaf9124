"""Same scan, same answer; a killed prediction run continues; --jobs N gives one process's files; one
writer per output folder; a full disk; hostile names in report.html; run folders that name files
elsewhere.

predict.py runs for real: in subprocesses where a process boundary matters (determinism across
processes, SIGKILL/SIGTERM, a file-size limit), in this process otherwise. Tiny synthetic scans on
the atlas grid, atlases given as files (no training).
"""
import csv
import glob
import json
import re
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from helpers import REPO, the_error_line
from ltnet_tf.commands import cli
from ltnet_tf.errors import DataError
from ltnet_tf.io import volumes as data
from ltnet_tf.prediction import cohort as cohort_lib, sources
from ltnet_tf.prediction.journal import JOURNAL_FOLDER
from ltnet_tf.prediction.lock import OutputLock

pytestmark = pytest.mark.slow  # predict.py killed and rerun in fresh processes (CI runs -m slow too)

SCAN_COPIES = 8  # scans in the cohort: enough to stop a run between two of them
SUBPROCESS_TIMEOUT = 900  # a hang guard only: the 2 shared cores can be very slow


@pytest.fixture(scope="module")
def cohort(dataset, tmp_path_factory):
    """SCAN_COPIES scans (the data set's 3, and copies under other names) and their references."""
    root = tmp_path_factory.mktemp("cohort")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for k in range(SCAN_COPIES):
        source = k % len(dataset.images)
        shutil.copy(dataset.images[source], images / f"scan{k}.nii.gz")
        shutil.copy(dataset.labels[source], labels / f"scan{k}.nii.gz")
    return images, labels


def predict_argv(dataset, images, output, *extra):
    return ["predict.py", "--atlas", dataset.atlas, "--atlas_labels", dataset.atlas_labels,
            "--images", str(images), "--output_dir", str(output), *extra]


def start(argv, **options):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **options)


def finish(process):
    out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
    return process.returncode, out, err


def segmentation(path):
    return np.asarray(nib.load(str(path)).dataobj)


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def wait_for_journal(folder, count, process):
    """Until ``count`` scans are recorded finished (the process still running)."""
    journal = os.path.join(folder, JOURNAL_FOLDER)
    deadline = time.time() + SUBPROCESS_TIMEOUT
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(journal) and len(glob.glob(os.path.join(journal, "*.json"))) >= count:
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended (or hung) before {count} scans were finished")


def temporary_files(folder):
    return glob.glob(os.path.join(folder, "**", ".*.tmp-*"), recursive=True)


@pytest.fixture(scope="module")
def reference(dataset, cohort, tmp_path_factory):
    """An uninterrupted run in its own process, one job."""
    images, labels = cohort
    output = tmp_path_factory.mktemp("reference")
    code, _, err = finish(start(predict_argv(dataset, images, output, "--labels", str(labels),
                                             "--jobs=1")))
    assert code == 0, err
    return output


# ------------------------------------------------------------------------------- same answer
def test_same_scan_same_bits_within_across_processes_and_cores(dataset, cohort, reference,
                                                               tmp_path):
    """One more process, pinned to one core, against the reference's (all cores): across
    processes and across core counts at once. (Across processes on the same cores is also
    test_killed_run_continues_without_losing_or_redoing_scans's: its last process's scans and
    tables equal the reference's, bit for bit.)"""
    images, labels = cohort
    assert shutil.which("taskset"), "taskset (util-linux) runs predict.py on one core"
    one_core = tmp_path / "one_core"
    process = subprocess.run(["taskset", "-c", "0", sys.executable,
                              *predict_argv(dataset, images, one_core, "--labels", str(labels))],
                             cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                             text=True, timeout=SUBPROCESS_TIMEOUT)
    assert process.returncode == 0, process.stderr
    for k in range(SCAN_COPIES):
        first = segmentation(reference / f"scan{k}_seg.nii.gz")
        np.testing.assert_array_equal(first, segmentation(one_core / f"scan{k}_seg.nii.gz"))
        # scan k and scan k+3 are the same file: the first scan of a process and a later one
        if k + len(dataset.images) < SCAN_COPIES:
            np.testing.assert_array_equal(
                first, segmentation(reference / f"scan{k + len(dataset.images)}_seg.nii.gz"))
    for table in ("volumes.csv", "dice.csv"):
        assert read_bytes(reference / table) == read_bytes(one_core / table)


# ------------------------------------------------------------------------------- killed runs
def table_rows(folder, table):
    """The scan of every row (dice.csv: of every scan's 'mean' row)."""
    with open(os.path.join(folder, table)) as f:
        rows = list(csv.reader(f))[1:]
    return [row[0] for row in rows if table != "dice.csv" or row[1] == "mean"]


def test_killed_run_continues_without_losing_or_redoing_scans(dataset, cohort, reference,
                                                              tmp_path):
    images, labels = cohort
    output = tmp_path / "out"
    argv = predict_argv(dataset, images, output, "--labels", str(labels))
    # SIGTERM after the first scan: a clean stop, one line, 143.
    process = start(argv)
    wait_for_journal(output, 1, process)
    process.send_signal(signal.SIGTERM)
    code, _, err = finish(process)
    assert code == 143, err
    stopped = [line for line in err.splitlines() if "stopped by SIGTERM" in line]
    assert len(stopped) == 1 and "run the same command again to continue" in stopped[0], err
    assert temporary_files(output) == []
    # SIGKILL after at least one more scan: nothing can clean up.
    finished = len(glob.glob(str(output / JOURNAL_FOLDER / "*.json")))
    process = start(argv)
    wait_for_journal(output, finished + 1, process)
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    kept = sorted(glob.glob(str(output / JOURNAL_FOLDER / "*.json")))
    assert finished < len(kept) < SCAN_COPIES
    kept_files = {p: os.stat(p).st_mtime_ns for name in kept
                  for p in glob.glob(str(output / (os.path.basename(name)[:-5] + "_*")))}
    # The same command again: the rest, then tables of every scan exactly once.
    code, out, err = finish(start(argv))
    assert code == 0, err
    assert f"{len(kept)} of {SCAN_COPIES} scans were finished by an earlier run" in out
    assert out.count("_seg.nii.gz (") == SCAN_COPIES - len(kept)  # only the others' lines
    assert {p: os.stat(p).st_mtime_ns for p in kept_files} == kept_files  # not rewritten
    names = [f"scan{k}" for k in range(SCAN_COPIES)]
    for table in ("volumes.csv", "dice.csv"):
        assert table_rows(output, table) == names
        assert read_bytes(output / table) == read_bytes(reference / table)
    with open(output / "prediction.json") as f:
        assert list(json.load(f)["scans"]) == names
    page = (output / "report.html").read_text()
    assert all(page.count(f"<h2>{name} ") == 1 for name in names)
    for name in names:
        np.testing.assert_array_equal(segmentation(output / f"{name}_seg.nii.gz"),
                                      segmentation(reference / f"{name}_seg.nii.gz"))
    assert temporary_files(output) == []


# ------------------------------------------------------------------------------- --jobs N
def without_time(record, folder):
    """prediction.json's content less what measures time ('seconds'), the output folder's path
    replaced by OUT."""
    if isinstance(record, dict):
        return {k: without_time(v, folder) for k, v in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [without_time(v, folder) for v in record]
    return record.replace(str(folder), "OUT") if isinstance(record, str) else record


def assert_same_outputs(folder, reference, names, tables=("volumes.csv", "dice.csv", "dice.json"),
                        kept=False):
    """Every scan's files and the tables byte for byte, prediction.json but for time."""
    for name in names:
        for suffix in ("_seg.nii.gz", "_qc.png"):
            assert read_bytes(folder / f"{name}{suffix}") == read_bytes(
                reference / f"{name}{suffix}"), name + suffix
    for table in tables:
        assert read_bytes(folder / table) == read_bytes(reference / table), table
    with open(folder / "prediction.json") as f, open(reference / "prediction.json") as g:
        ours, theirs = without_time(json.load(f), folder), without_time(json.load(g), reference)
    for record in ours["scans"].values() if kept else ():
        record.pop("kept_from_earlier_run", None)
    assert ours == theirs
    assert temporary_files(folder) == []


def test_two_jobs_write_what_one_process_writes(dataset, cohort, reference, tmp_path, capsys):
    """Two processes (this one, and one spawned on every other scan): the same bytes."""
    images, labels = cohort
    output = tmp_path / "out"
    assert cli.predict_main(predict_argv(dataset, images, output, "--labels", str(labels),
                                         "--jobs=2")) == 0
    out = capsys.readouterr().out
    assert "2 jobs segment the 8 scans to do" in out
    assert [f"[{k}/{SCAN_COPIES}]" in out for k in range(1, SCAN_COPIES + 1)] == [True] * 8
    assert_same_outputs(output, reference, [f"scan{k}" for k in range(SCAN_COPIES)])


def running(pid: int) -> bool:
    """The process exists and is not a zombie (ended, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_killed_two_job_run_continues(dataset, cohort, reference, tmp_path):
    """SIGKILL to the first job: the other dies with it (the kernel's doing); the same command
    again finishes the cohort, and its files are one process's."""
    images, labels = cohort
    output = tmp_path / "out"
    argv = predict_argv(dataset, images, output, "--labels", str(labels), "--jobs=2")
    process = start(argv)
    wait_for_journal(output, 1, process)
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as f:
        children = [int(pid) for pid in f.read().split()]
    process.send_signal(signal.SIGKILL)
    assert finish(process)[0] == -signal.SIGKILL
    deadline = time.time() + 10
    while any(map(running, children)) and time.time() < deadline:
        time.sleep(0.05)
    assert children and not any(map(running, children))
    kept = len(glob.glob(str(output / JOURNAL_FOLDER / "*.json")))
    assert 1 <= kept < SCAN_COPIES and not (output / "prediction.json").exists()
    code, out, err = finish(start(argv))
    assert code == 0, err
    assert f"{kept} of {SCAN_COPIES} scans were finished by an earlier run" in out
    assert_same_outputs(output, reference, [f"scan{k}" for k in range(SCAN_COPIES)], kept=True)


def test_jobs_share_a_shard(dataset, cohort, reference, tmp_path):
    """--shard 1/2 --jobs 2: the share's scans, files and table rows as in the whole run."""
    images, labels = cohort
    output = tmp_path / "out"
    assert cli.predict_main(predict_argv(dataset, images, output, "--labels", str(labels),
                                         "--shard=1/2", "--jobs=2")) == 0
    names = [f"scan{k}" for k in range(0, SCAN_COPIES, 2)]
    for name in names:
        assert read_bytes(output / f"{name}_seg.nii.gz") == read_bytes(
            reference / f"{name}_seg.nii.gz")
    with open(output / "volumes.shard-1-of-2.csv") as f, open(reference / "volumes.csv") as g:
        share, whole = list(csv.reader(f)), list(csv.reader(g))
    assert share == [whole[0], *[row for row in whole[1:] if row[0] in names]]


def test_other_settings_redo_the_scans(dataset, cohort, reference, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    images, labels = cohort
    assert cli.predict_main(predict_argv(dataset, images, output, "--labels", str(labels),
                                         "--refine_steps=3")) == 0
    with open(output / "prediction.json") as f:
        scans = json.load(f)["scans"]
    assert not any(record.get("kept_from_earlier_run") for record in scans.values())
    assert json.load(open(output / "prediction.json"))["refinement"]["steps"] == 3


# ------------------------------------------------------------------------------- writers, disk
def test_a_second_writer_is_refused_shares_are_not(dataset, cohort, tmp_path, capsys,
                                                   monkeypatch):
    """Refused before anything is read or loaded: the atlases, the network and the checks of the
    scans would fail this test if they were reached."""
    images, _ = cohort
    output = tmp_path / "out"
    output.mkdir()

    def reached(*args, **kwargs):
        raise AssertionError("the lock was not the first thing the run did")

    with monkeypatch.context() as patched, OutputLock(str(output)):
        for name in ("load_atlases", "check_inputs", "build_run_records"):
            patched.setattr(cohort_lib, name, reached)
        patched.setattr(sources.RunFolderNetwork, "__init__", reached)
        assert cli.predict_main(predict_argv(dataset, images, output, "--noqc")) == 1
        the_error_line(capsys, "another predict.py is writing to this folder",
                       f"process {os.getpid()}", "whole cohort")
        assert cli.predict_main(["predict.py", "--model_dir", str(tmp_path / "run"), "--images",
                                 str(images), "--output_dir", str(output)]) == 1
        the_error_line(capsys, "another predict.py is writing to this folder")
        with pytest.raises(DataError, match="another predict.py is writing"):  # the library
            cohort_lib.predict_files(images, output, atlas=dataset.atlas,
                                     atlas_labels=dataset.atlas_labels)
        assert cli.predict_main(predict_argv(dataset, images, output, "--shard=1/2")) == 1
        the_error_line(capsys, "another predict.py is writing to this folder")
    assert not glob.glob(str(output / "*_seg.nii.gz"))
    with OutputLock(str(output), shard=(1, 2)):
        with pytest.raises(DataError, match=r"share 1/2"):
            OutputLock(str(output), shard=(1, 2)).acquire()
        with pytest.raises(DataError, match=r"share 1/2"):
            OutputLock(str(output)).acquire()
        assert cli.predict_main(predict_argv(dataset, images, output, "--shard=2/2",
                                             "--noqc")) == 0
    assert os.path.isfile(output / "volumes.shard-2-of-2.csv")


def test_full_disk_is_one_line_and_keeps_earlier_outputs(dataset, cohort, reference, tmp_path):
    images, labels = cohort
    output = tmp_path / "out"
    shutil.copytree(reference, output)
    before = {p: read_bytes(p) for p in glob.glob(str(output / "**"), recursive=True)
              if os.path.isfile(p) and not p.endswith(".lock")}

    def small_file_limit():  # no file over 16 KiB: a displacement field cannot be written
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 10, 16 << 10))

    # --save_flow: other outputs, so every scan is redone (the same segmentations, the same bytes)
    process = start(predict_argv(dataset, images, output, "--labels", str(labels),
                                 "--save_flow"), preexec_fn=small_file_limit)
    code, _, err = finish(process)
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(r"cannot write scan\d_flow.nii.gz \(File too large\): the 0 "
                     r"scans finished before are intact; free space and run the same command "
                     r"again to continue", errors[0]), errors[0]
    assert {p: read_bytes(p) for p in before} == before
    assert temporary_files(output) == []


def test_same_bits_with_a_trained_network_on_one_and_two_cores(trained_run, cohort, tmp_path):
    """G_F's convolutions (oneDNN) and the refinement from its displacement: identical in two
    processes, one of them on one core."""
    images, _ = cohort
    outputs = []
    for name, prefix in (("two_cores", []), ("one_core", ["taskset", "-c", "0"])):
        output = tmp_path / name
        done = subprocess.run([*prefix, sys.executable, "predict.py", "--model_dir",
                               trained_run.path, "--images", str(images), "--output_dir",
                               str(output), "--noqc"], cwd=REPO,
                              env=dict(os.environ, PYTHONPATH=REPO), capture_output=True,
                              text=True, timeout=SUBPROCESS_TIMEOUT)
        assert done.returncode == 0, done.stderr
        outputs.append(output)
    for k in range(SCAN_COPIES):
        np.testing.assert_array_equal(segmentation(outputs[0] / f"scan{k}_seg.nii.gz"),
                                      segmentation(outputs[1] / f"scan{k}_seg.nii.gz"))
    assert read_bytes(outputs[0] / "volumes.csv") == read_bytes(outputs[1] / "volumes.csv")
