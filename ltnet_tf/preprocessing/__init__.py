"""Scans as they come off the scanner, made ready for label transfer: brain extraction of whole
heads (``brain_extraction``: deepbet's network, the mask checked), N4 bias-field correction
(``bias``), and what a prediction does to one scan before it is aligned (``preparation``).

May import: the shared facts and ``ltnet_tf.io``.
"""
