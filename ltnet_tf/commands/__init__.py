"""The command lines: ``train.py``, ``predict.py``, ``ltnet-export`` (``cli``: flags
turned into library calls, one-line errors), the training flags generated from ``LTNetConfig``,
and the built-in demo with its synthetic data.

May import: every other layer.
"""
