"""Training LT-Net: the Keras model with the alternating discriminator / generator ``train_step``
(``model.LTNet``), the tf.data pipeline, callbacks (progress, divergence guard, validation,
checkpoints), SIGTERM/Ctrl-C handling, ``tf.distribute`` strategies, and ``train()`` (``trainer``).

May import: the shared facts, ``io``, ``registration``, ``reporting`` and ``serving`` (a run ends
with its export).
"""


def __getattr__(name):
    # ``ltnet_tf.training.train(...)``, as before the layers had folders, without importing
    # TensorFlow for ``import ltnet_tf.training.signals``-style imports of one module.
    if name in ("train", "resolve_config", "build_model", "make_checkpoint", "ProgressLog"):
        from ltnet_tf.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
