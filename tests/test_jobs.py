"""How many jobs ``predict.py`` runs by default (``ltnet_tf.prediction.jobs.default_jobs``): one per
two usable cores, as far as the available memory holds a job. The runs themselves (--jobs 2 equal to
--jobs 1, killed and continued, with --shard) are in test_resume.py."""
import pytest

from ltnet_tf.prediction import jobs


@pytest.mark.parametrize("cores, memory_gb, atlases, expected", [
    (2, 8.0, 1, 1),      # this project's machines: 1
    (3, 8.0, 1, 1),      # an odd core is not a job
    (16, 32.0, 1, 8),    # cores decide
    (16, 10.0, 1, 3),    # memory decides: 3 GB a job
    (16, 10.0, 5, 2),    # further atlases: 0.5 GB each, per job
    (64, None, 1, 32),   # memory unknown: cores decide
    (16, 1.0, 1, 1),     # never fewer than one
])
def test_default_jobs(monkeypatch, cores, memory_gb, atlases, expected):
    monkeypatch.setattr(jobs, "usable_cores", lambda: cores)
    monkeypatch.setattr(jobs, "available_memory_gb", lambda: memory_gb)
    assert jobs.default_jobs(2, atlases) == expected


def test_machine_threads_mean_one_job(monkeypatch):
    """LTNET_TF_THREADS=machine: TensorFlow's own pools already use every core."""
    monkeypatch.setattr(jobs, "usable_cores", lambda: 64)
    assert jobs.default_jobs(None) == 1


def test_this_machine_is_read():
    assert jobs.usable_cores() >= 1
    memory = jobs.available_memory_gb()
    assert memory is None or memory > 0
