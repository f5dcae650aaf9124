"""Segmenting scans: ``Predictor`` (one scan: check, align, network, refine, pull, fuse), the
network of a run folder (``sources``), ``predict_files`` (a cohort: checks first, shards,
read-ahead), the output folder, what a run records per scan, and the merge of shards.

May import: every layer below it (shared facts, ``io``, ``registration``, ``reporting``,
``serving``, ``training``); nothing imports it but ``commands``.
"""


def __getattr__(name):
    # ``ltnet_tf.prediction.Predictor`` as before; importing ``merge`` alone stays TensorFlow-free.
    if name in ("Predictor", "StageClock", "check_scan"):
        from ltnet_tf.prediction import predictor

        return getattr(predictor, name)
    if name in ("predict_files", "PredictOptions"):
        from ltnet_tf.prediction import cohort

        return getattr(cohort, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
