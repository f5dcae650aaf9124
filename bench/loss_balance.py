"""Loss balance of a trained run: each generator term's weighted gradient on G_F and its cosine with
L_sim's (printed). A term whose gradient is large and points against L_sim's brakes the
registration; this is how the default cycle weights were chosen.

    python -m bench.loss_balance --model_dir RUN --scan $LTNET_DATA_DIR/images/sub-01.nii.gz
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import tensorflow as tf
from absl import app, flags

from ltnet_tf.io import volumes
from ltnet_tf.serving.modeldir import ModelDir
from ltnet_tf.training.trainer import build_model, make_checkpoint

flags.DEFINE_string("model_dir", None, "A training run folder (its last checkpoint is used).")
flags.DEFINE_string("scan", None, "An unlabelled scan on the atlas grid.")
flags.mark_flags_as_required(["model_dir", "scan"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    model_dir = ModelDir(FLAGS.model_dir)
    config = model_dir.load_config()
    model = build_model(config, *model_dir.load_atlas())
    checkpoint = tf.train.latest_checkpoint(model_dir.checkpoint_dir)
    make_checkpoint(model).restore(checkpoint).expect_partial()
    scan = volumes.preprocess_scan(volumes.load_scan(FLAGS.scan).data, config)[None]
    with tf.GradientTape(persistent=True) as tape:
        terms, _, _ = model.generator_terms(tf.constant(scan), training=True)
    variables = model.forward_generator.trainable_variables

    def weighted_gradient(name):  # on G_F; None for the terms that train G_B only
        gradients = [tf.reshape(g, [-1]) for g in tape.gradient(terms[name], variables)
                     if g is not None]
        return getattr(config, f"weight_{name}") * tf.concat(gradients, 0) if gradients else None

    reference = weighted_gradient("sim")
    print(f"{checkpoint}, scan {FLAGS.scan}\n{'term':12s} {'value':>8s} {'weight':>7s} "
          f"{'|w·grad| on G_F':>16s} {'cos with sim':>13s}")
    for name, value in terms.items():
        gradient, weight = weighted_gradient(name), getattr(config, f"weight_{name}")
        if gradient is None:
            print(f"{name:12s} {float(value[0]):8.4f} {weight:7.3g} {'(trains G_B only)':>16s}")
            continue
        cosine = tf.reduce_sum(gradient * reference) / (tf.norm(gradient) * tf.norm(reference))
        print(f"{name:12s} {float(value[0]):8.4f} {weight:7.3g} {float(tf.norm(gradient)):16.3e} "
              f"{float(cosine):+13.3f}")


if __name__ == "__main__":
    app.run(main)
