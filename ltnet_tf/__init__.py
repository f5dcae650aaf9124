"""ltnet_tf: one-shot segmentation by learned label transfer (LT-Net, CVPR 2020) on VoxelMorph.

The package's folders are its layers, each importing only from those before it (the order is
written once, in ``LAYERS``; ``tests/test_layers.py`` enforces it):

    compat, config, errors, files   facts every layer shares
    io            reading, writing and describing scans and label maps
    preprocessing brain extraction of whole heads, bias-field correction
    registration  alignment, LT-Net's networks and losses, warping, refinement, label pull, fusion
    labelling     the transferred labels finished by a per-scan intensity model (EM)
    reporting     QC pictures, report.html, the tables
    serving       the run folder, the SavedModel for TF Serving, generator.h5 for VoxelMorph
    training      the LTNet Keras model, its data, callbacks and ``train()``
    segmentation  a segmentation network trained from the label transfer: U-Net, examples, fitting
    prediction    ``Predictor`` (one scan), ``predict_files`` (a cohort), outputs, merge
    commands      train.py / predict.py / export / demo: flags turned into calls
"""
from ltnet_tf import compat  # noqa: F401  (must run before TensorFlow is imported)

__version__ = "0.1.0"

LAYERS = ("compat", "errors", "files", "config", "io", "preprocessing", "registration",
          "labelling", "reporting", "serving", "training", "segmentation", "prediction",
          "commands")
