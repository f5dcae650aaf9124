"""The trained model as an artefact: its run folder (``ModelDir``: config, checkpoints, atlas,
label names), the SavedModel for TF Serving with named, input-checked signatures (``export``,
``serving_inputs``), and G_F as ``generator.h5`` for ``voxelmorph.networks.VxmDense.load``.

May import: the shared facts, ``ltnet_tf.io`` and ``ltnet_tf.registration``.
"""
