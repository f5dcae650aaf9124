"""The names a SavedModel client uses: signatures and their extra inputs. One leaf module, so that
the exporter (``export``) and the readers (``ltnet_tf.prediction.sources``, TF Serving clients in
the docs and tests) agree without importing each other.
"""
SERVING_SIGNATURE = "serving_default"
REGISTER_SIGNATURE = "register"
SEGMENT_SIGNATURE = "segment"  # segmentation only: what predict.py runs unless asked for more
SEGMENT_REFINED_SIGNATURE = "segment_refined"
DISPLACEMENT_SIGNATURE = "displacement"  # G_F's working-grid displacement alone
STEPS_INPUT = "steps"
COARSE_STEPS_INPUT = "coarse_steps"
