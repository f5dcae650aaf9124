"""A cohort split over processes (predict.py --shard K/N) and merged (ltnet-merge):
two real processes on tiny scans, segmenting without a trained network (atlas and refinement)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, SUBPROCESS_TIMEOUT
from ltnet_tf.prediction import cohort, lock, merge

pytestmark = pytest.mark.slow  # predict.py shards in fresh processes (CI runs -m slow too)

VOLATILE = {"seconds", "output", "image", "qc_png"}


def predict_argv(dataset, out, *extra):
    return [sys.executable, os.path.join(REPO, "predict.py"), "--atlas", dataset.atlas,
            "--atlas_labels", dataset.atlas_labels, "--images", dataset.images_dir,
            "--labels", dataset.labels_dir, "--output_dir", str(out), "--refine_steps=2",
            "--refine_coarse_steps=3", *extra]


def run_all(*commands):
    """Start every command at once, wait for all; each must succeed."""
    processes = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=4 * SUBPROCESS_TIMEOUT)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output
    return outputs


def scrubbed(scans: dict) -> dict:
    return {name: {k: v for k, v in record.items() if k not in VOLATILE}
            for name, record in scans.items()}


@pytest.fixture(scope="module")
def single_and_shards(dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    run_all(predict_argv(dataset, root / "single"),
            predict_argv(dataset, root / "shared", "--shard", "1/2"),
            predict_argv(dataset, root / "shared", "--shard", "2/2"))
    return root


def test_shards_split_the_sorted_scans_and_never_collide(single_and_shards):
    shared = single_and_shards / "shared"
    names = sorted(os.listdir(shared))
    for k in (1, 2):
        for table in ("prediction", "dice"):
            assert f"{table}.shard-{k}-of-2.json" in names
        assert f"volumes.shard-{k}-of-2.csv" in names and f"report.shard-{k}-of-2.html" in names
    assert "prediction.json" not in names and "volumes.csv" not in names
    first = json.loads((shared / "prediction.shard-1-of-2.json").read_text())
    second = json.loads((shared / "prediction.shard-2-of-2.json").read_text())
    assert sorted(first["scans"]) == ["scan_00", "scan_02"]  # every 2nd from the 1st
    assert sorted(second["scans"]) == ["scan_01"]
    assert first["shard"] == [1, 2] and first["producer"] == second["producer"]


def test_merged_outputs_equal_a_single_run(single_and_shards):
    shared, single = single_and_shards / "shared", single_and_shards / "single"
    assert merge.main([str(shared)]) == 0
    for table in ("volumes.csv", "dice.csv"):
        assert (shared / table).read_bytes() == (single / table).read_bytes(), table
    merged = json.loads((shared / "prediction.json").read_text())
    whole = json.loads((single / "prediction.json").read_text())
    assert scrubbed(merged["scans"]) == scrubbed(whole["scans"])
    assert merged["mean_dice"] == pytest.approx(whole["mean_dice"])
    assert merged["producer"] == whole["producer"]
    assert json.loads((shared / "dice.json").read_text()) == json.loads(
        (single / "dice.json").read_text())
    page = (shared / "report.html").read_text()
    assert all(name in page for name in ("scan_00", "scan_01", "scan_02"))
    assert page.count("data:image/png;base64,") == 3  # every share's QC picture found


def test_merge_refuses_a_scan_twice(single_and_shards, dataset, capsys):
    assert merge.main([str(single_and_shards / "single"), str(single_and_shards / "shared")]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith("ltnet-merge: error:") and "also in" in error
    assert "\n" not in error


def test_merge_refuses_shares_of_other_settings(single_and_shards, dataset, tmp_path, capsys):
    """Share 1/2 of the module's run beside a share 2/2 made with another refinement budget
    (one process more: the first share is the fixture's, copied)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in os.listdir(single_and_shards / "shared"):  # share 1/2's tables and scans only
        if "shard-1-of-2" in name or name.startswith(("scan_00", "scan_02")):
            shutil.copy(single_and_shards / "shared" / name, out)
    run_all(predict_argv(dataset, out, "--shard", "2/2", "--refine_steps=1"))
    assert merge.main([str(out)]) == 1
    error = capsys.readouterr().err
    assert "made by another model, atlases or settings" in error


def test_a_missing_share_is_named(dataset, tmp_path, capsys):
    out = tmp_path / "out"
    run_all(predict_argv(dataset, out, "--shard", "2/3", "--noqc"))
    assert merge.main([str(out)]) == 0
    captured = capsys.readouterr()
    assert "shares 1/3, 3/3 not found" in captured.err
    assert "1 scans merged" in captured.out


def test_shard_flag_is_checked():
    for text in ("0/2", "3/2", "a/b", "2"):
        with pytest.raises(cohort.ConfigError, match="--shard"):
            lock.parse_shard(text)
    assert cohort.shard_of(["b.nii.gz", "a.nii.gz", "c.nii.gz"], (2, 2)) == ["b.nii.gz"]
