"""From the label transfer's answer to the scan's labels: a per-scan intensity model on the
transfer's prior (``intensity_model``: a Gaussian per structure fitted to the scan by EM, the
transferred labels as a smoothed prior, SAMSEG-style).

May import: the shared facts and ``ltnet_tf.io``. NumPy and SciPy only: no TensorFlow.
"""
