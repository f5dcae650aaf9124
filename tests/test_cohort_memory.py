"""A cohort segmented in one process (``cohort.predict_files``) must not grow with the number of
scans: a study of thousands of scans runs in one ``predict.py``. Resident memory is read after every
scan of a 40-scan run (copies of the synthetic scans under other names, 32³ voxels each).

The bound, 64 KiB per scan, sits between what a scan legitimately leaves behind and what a leak
would: the run keeps each scan's record, volumes and Dice for the final tables (a few KiB; measured
growth without a leak: 6-15 KiB per scan), while keeping one 32³ segmentation (int32) or scan
(float32) per scan costs 128 KiB, and a tf.function traced again per scan far more.

Readings are noisy in steps: TensorFlow and the allocator warm up over the first scans (steps of
1-10 MiB until scan 7 or so), and later a one-off allocation (a lazily built kernel, a larger
arena) adds a few hundred KiB once. So the first 10 scans are left out, and the growth per scan is
the smaller of the two halves' slopes (scans 10-25 and 25-40), each the median slope over all pairs
of its scans (Theil-Sen): a leak grows both halves, a one-off step only one. Before each reading
the garbage collector runs and glibc returns freed heap pages to the system (``malloc_trim``), so
freed memory is not counted.
"""
import ctypes
import ctypes.util
import gc
import os
import shutil

import numpy as np
import pytest

from ltnet_tf.commands import synthetic
from ltnet_tf.config import RefinementSettings
from ltnet_tf.prediction import cohort, run_records

pytestmark = pytest.mark.slow  # predict.py over a hundred scans in a fresh process (CI runs -m slow too)

SHAPE = (32, 32, 32)
SCANS = 40
FIRST_MEASURED = 10  # scans before this one warm up
BOUND_BYTES_PER_SCAN = 64 * 1024

_LIBC = ctypes.CDLL(ctypes.util.find_library("c"))
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory after a garbage collection, freed heap pages returned."""
    gc.collect()
    if hasattr(_LIBC, "malloc_trim"):  # glibc
        _LIBC.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def theil_sen_slope(values) -> float:
    """Median of the slopes between all pairs of points (index, value)."""
    values = np.asarray(values, np.float64)
    i, j = np.triu_indices(len(values), k=1)
    return float(np.median((values[j] - values[i]) / (j - i)))


@pytest.fixture(scope="module")
def many_scans(tmp_path_factory):
    """SCANS scans and their reference label maps: copies of 3 synthetic scans, other names."""
    root = tmp_path_factory.mktemp("cohort")
    demo = synthetic.make_demo_dataset(str(root / "demo"), n_scans=3, shape=SHAPE, seed=3)
    images, labels = root / "images", root / "labels"
    images.mkdir(), labels.mkdir()
    for index in range(SCANS):
        name = f"case_{index:03d}.nii.gz"
        shutil.copy(demo["images"][index % 3], images / name)
        shutil.copy(demo["labels"][index % 3], labels / name)
    return demo, str(images), str(labels)


def growth_per_scan(readings) -> float:
    """The smaller of the Theil-Sen slopes of the two halves of ``readings`` (they share the middle
    reading)."""
    middle = len(readings) // 2
    return min(theil_sen_slope(readings[:middle + 1]), theil_sen_slope(readings[middle:]))


def test_growth_per_scan_sees_a_leak_and_ignores_a_one_off_step():
    leaking = np.arange(31) * 128 * 1024.0
    assert growth_per_scan(leaking) == pytest.approx(128 * 1024)
    for step_at in (1, 8, 15, 16, 29):
        steady = np.arange(31) * 1000.0
        steady[step_at:] += 5e6
        assert growth_per_scan(steady) == pytest.approx(1000.0), step_at


def test_memory_does_not_grow_with_the_number_of_scans(many_scans, tmp_path, monkeypatch):
    demo, images, labels = many_scans
    after_scan = []
    add = run_records.RunRecords.add

    def measured(self, *args, **kwargs):
        record = add(self, *args, **kwargs)
        after_scan.append(resident_bytes())
        return record

    monkeypatch.setattr(run_records.RunRecords, "add", measured)
    options = cohort.PredictOptions(refinement=RefinementSettings(steps=2, coarse_steps=3))
    result = cohort.predict_files(images, str(tmp_path / "out"), labels, atlas=demo["atlas"],
                                  atlas_labels=demo["atlas_labels"], options=options)
    assert len(result["outputs"]) == SCANS and len(after_scan) == SCANS
    assert len(result["dice"]["scans"]) == SCANS and (tmp_path / "out" / "case_039_qc.png").exists()
    measured_part = after_scan[FIRST_MEASURED - 1:]
    slope = growth_per_scan(measured_part)
    growth = measured_part[-1] - measured_part[0]
    print(f"resident memory after scan {FIRST_MEASURED}: {measured_part[0] / 2**20:.1f} MiB, "
          f"after scan {SCANS}: {measured_part[-1] / 2**20:.1f} MiB; growth {growth / 1024:.0f} "
          f"KiB, {slope / 1024:.1f} KiB per scan")
    assert slope < BOUND_BYTES_PER_SCAN, (
        f"resident memory grows by {slope / 1024:.1f} KiB per scan (bound "
        f"{BOUND_BYTES_PER_SCAN // 1024} KiB): something is kept per scan; MiB after each scan: "
        f"{[round(b / 2**20, 2) for b in after_scan]}")
