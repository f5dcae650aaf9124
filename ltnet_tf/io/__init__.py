"""Scans and label maps: reading and writing them (NIfTI, MGZ; header kept), checking and
describing them (headers, is it a skull-stripped brain, robust intensities), structure names
(FreeSurfer's, a LUT, ITK-SNAP, BIDS ``dseg.tsv``), scans paired with label maps, and Dice.

May import: the shared facts (``ltnet_tf.compat``, ``config``, ``errors``, ``files``) only.
"""
