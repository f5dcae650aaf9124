"""LTNet (ltnet_tf.training.model): training on a synthetic pair, update isolation, presets, logs, hard Dice."""
import numpy as np
import pytest

from ltnet_tf import config as ltnet_config  # noqa: I001  (before TensorFlow: sets TF_USE_LEGACY_KERAS)
from ltnet_tf.training.model import WARMED_UP_TERMS, LTNet, hard_dice
import tensorflow as tf

GRID = 16
SLIM = dict(atlas_shape=[GRID] * 3, label_ids=[0, 1], enc_features=[8, 8], dec_features=[8, 8, 8, 8],
            disc_features=[4, 8])
ALL_TERMS = {"sim", "smooth", "adv", "cyc_img", "cyc_label", "cyc_flow", "back_sim", "back_smooth"}
CYCLE_TERMS = {"cyc_img", "cyc_label", "cyc_flow", "back_sim", "back_smooth"}
# What each preset of the paper's ablation logs during training, written out rather than derived.
EXPECTED_LOGS = {
    "voxelmorph": {"sim", "smooth", "g_loss"},
    "voxelmorph_gan": {"sim", "smooth", "adv", "g_loss", "d_loss"},
    "voxelmorph_cycle": {"sim", "smooth", *CYCLE_TERMS, "g_loss"},
    "ltnet": {*ALL_TERMS, "g_loss", "d_loss"},
}


def _blob(center, radius=4.5):
    """A soft-edged sphere image [1, G, G, G, 1] and its label map as one-hot [1, G, G, G, 2]."""
    grid = np.stack(np.meshgrid(*[np.arange(GRID)] * 3, indexing="ij"), axis=-1)
    distance = np.linalg.norm(grid - np.asarray(center), axis=-1)
    image = 1.0 / (1.0 + np.exp(distance - radius))
    labels = (distance <= radius).astype(np.int64)
    return (image[None, ..., None].astype(np.float32),
            np.eye(2, dtype=np.float32)[labels][None])


CENTRE = np.full(3, GRID / 2 - 0.5)
ATLAS, ATLAS_ONEHOT = _blob(CENTRE)
SCAN, SCAN_ONEHOT = _blob(CENTRE + [2.5, -2.0, 2.0])  # the same blob moved by ~4 voxels


def _model(preset: str, run_eagerly: bool = False, **changes) -> LTNet:
    """run_eagerly skips tracing the step (tens of seconds on CPU), for tests of one or two steps."""
    tf.keras.utils.set_random_seed(0)
    model = LTNet(ltnet_config.preset(preset, **{**SLIM, **changes}), ATLAS, ATLAS_ONEHOT)
    model.compile(run_eagerly=run_eagerly)
    return model


def _fit(model: LTNet, steps: int) -> dict:
    scans = tf.data.Dataset.from_tensors(SCAN).repeat(steps)
    return model.fit(scans, epochs=1, verbose=0).history


def _evaluate(model: LTNet) -> dict:
    return model.evaluate(SCAN, SCAN_ONEHOT, batch_size=1, verbose=0, return_dict=True)


def numpy_hard_dice(reference_onehot, predicted_onehot):
    """Mean Dice over the foreground labels present in the reference, after argmax, per example."""
    reference = reference_onehot.argmax(-1)
    predicted = predicted_onehot.argmax(-1)
    scores = []
    for ref, pred in zip(reference, predicted):
        dices = [2 * np.sum((ref == label) & (pred == label)) / (np.sum(ref == label)
                                                                 + np.sum(pred == label))
                 for label in range(1, reference_onehot.shape[-1]) if np.any(ref == label)]
        scores.append(np.mean(dices))
    return np.array(scores)


def _snapshot(variables):
    return [v.numpy().copy() for v in variables]


# ---------------------------------------------------------------------------------------- training
@pytest.mark.slow  # trains in TensorFlow for many steps (CI runs -m slow too)
def test_training_registers_the_shifted_blob():
    model = _model("voxelmorph", g_learning_rate=1e-2)
    before = _evaluate(model)
    # The freshly initialised G_F is close to the identity: Dice is the unregistered overlap.
    np.testing.assert_allclose(before["dice"], numpy_hard_dice(SCAN_ONEHOT, ATLAS_ONEHOT)[0],
                               atol=1e-3)

    history = _fit(model, steps=20)
    after = _evaluate(model)

    assert np.all(np.isfinite(history["g_loss"]))
    assert after["sim"] < 0.5 * before["sim"], (before, after)
    assert after["dice"] > before["dice"] + 0.3, (before, after)


@pytest.mark.slow  # trains in TensorFlow for many steps (CI runs -m slow too)
def test_ltnet_preset_trains_without_nan():
    model = _model("ltnet", g_learning_rate=1e-3, d_learning_rate=1e-3)
    history = _fit(model, steps=8)
    after = _evaluate(model)
    assert set(history) == EXPECTED_LOGS["ltnet"]
    for name, values in history.items():
        assert np.all(np.isfinite(values)), name
    for name, value in after.items():
        assert np.isfinite(value), name


# ---------------------------------------------------------------------------- update isolation
@pytest.fixture(scope="module")
def ltnet_model():
    return _model("ltnet", run_eagerly=True)


def test_generator_step_updates_only_the_generators(ltnet_model):
    model = ltnet_model
    generators = model.forward_generator.variables + model.backward_generator.variables
    discriminator_before = _snapshot(model.discriminator.variables)
    generators_before = _snapshot(generators)

    model.generator_step(tf.constant(SCAN))

    for variable, before in zip(model.discriminator.variables, discriminator_before):
        assert np.array_equal(variable.numpy(), before), variable.name
    for variable, before in zip(generators, generators_before):
        assert not np.array_equal(variable.numpy(), before), f"{variable.name} was not trained"


def test_discriminator_step_updates_only_the_discriminator(ltnet_model):
    model = ltnet_model
    generators = model.forward_generator.variables + model.backward_generator.variables
    warped_atlas, _ = model(tf.constant(SCAN))
    discriminator_before = _snapshot(model.discriminator.variables)
    generators_before = _snapshot(generators)

    d_loss = model.discriminator_step(tf.constant(SCAN), warped_atlas)

    assert d_loss.shape == (1,) and np.all(d_loss.numpy() > 0)
    for variable, before in zip(generators, generators_before):
        assert np.array_equal(variable.numpy(), before), variable.name
    for variable, before in zip(model.discriminator.variables, discriminator_before):
        assert not np.array_equal(variable.numpy(), before), f"{variable.name} was not trained"


def test_evaluate_accepts_scan_only_tuples():
    """train_step takes (scan,) as well as scan; validation data must be unpacked the same way."""
    model = _model("voxelmorph", run_eagerly=True)
    logs = model.evaluate(tf.data.Dataset.from_tensors((SCAN,)), verbose=0, return_dict=True)
    assert set(logs) == {"sim", "smooth", "g_loss"}


def test_mixed_precision_scales_the_losses():
    """Under mixed_float16 a custom train_step must scale its losses, or float16 gradients underflow.

    Keras only wraps the optimizer given to ``Model.compile``; LTNet's own g/d optimizers need
    ``LossScaleOptimizer`` (and ``get_scaled_loss`` / ``get_unscaled_gradients`` in the steps).
    """
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model("voxelmorph_gan", run_eagerly=True)
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    assert isinstance(model.g_optimizer, tf.keras.mixed_precision.LossScaleOptimizer)
    assert isinstance(model.d_optimizer, tf.keras.mixed_precision.LossScaleOptimizer)


# ----------------------------------------------------------------------------- presets and logs
def test_expected_logs_cover_every_preset():
    assert set(ltnet_config.PRESETS) == set(EXPECTED_LOGS)


def _check_logs(model: LTNet, history: dict, expected_names: set):
    assert set(history) == expected_names
    logs = {name: values[-1] for name, values in history.items()}
    for name, value in logs.items():
        assert np.isfinite(value) and value >= 0, (name, value)
    # g_loss is the weighted sum of the generator terms (one step, one scan: no averaging across).
    config = model.ltnet_config
    # The logs are of the first step, where the cycle terms' weights are 1/cycle_warmup_steps.
    ramp = 1.0 / config.cycle_warmup_steps if config.cycle_warmup_steps else 1.0
    weighted = sum(getattr(config, f"weight_{name}") * logs[name]
                   * (ramp if name in WARMED_UP_TERMS else 1.0)
                   for name in logs if name in ALL_TERMS)
    np.testing.assert_allclose(logs["g_loss"], weighted, rtol=1e-5)


@pytest.mark.slow  # trains in TensorFlow for many steps (CI runs -m slow too)
def test_cycle_weights_ramp_in_over_the_warmup():
    model = _model("ltnet", run_eagerly=True, cycle_warmup_steps=4)
    ramps = []
    for _ in range(6):
        ramps.append(float(model.cycle_ramp()))
        _fit(model, 1)
    np.testing.assert_allclose(ramps, [0.25, 0.5, 0.75, 1.0, 1.0, 1.0])
    assert float(_model("ltnet", run_eagerly=True, cycle_warmup_steps=0).cycle_ramp()) == 1.0


@pytest.mark.parametrize("preset", sorted(EXPECTED_LOGS))
def test_preset_builds_and_trains_one_step(preset):
    model = _model(preset, run_eagerly=True)
    expected = EXPECTED_LOGS[preset]
    assert (model.backward_generator is not None) == bool(expected & CYCLE_TERMS)
    assert (model.discriminator is not None) == ("adv" in expected)
    assert (model.d_optimizer is not None) == ("adv" in expected)

    _check_logs(model, _fit(model, steps=1), expected)


@pytest.mark.parametrize("weight, removed", [
    ("weight_cyc_flow", {"cyc_flow"}),
    ("weight_adv", {"adv", "d_loss"}),
])
def test_zero_weight_removes_its_term_from_the_logs(weight, removed):
    model = _model("ltnet", run_eagerly=True, **{weight: 0.0})
    if weight == "weight_adv":
        assert model.discriminator is None
    _check_logs(model, _fit(model, steps=1), EXPECTED_LOGS["ltnet"] - removed)


# -------------------------------------------------------------------------------------- hard Dice
def test_hard_dice_matches_numpy():
    rng = np.random.default_rng(0)
    n_labels = 4
    reference = np.eye(n_labels, dtype=np.float32)[rng.integers(0, n_labels, (2, 6, 6, 6))]
    reference[1, ..., 3] = 0  # label 3 absent from the second reference: left out of its mean
    reference[1, ..., 0] = 1 - reference[1, ..., 1:].sum(-1)
    predicted = rng.dirichlet(np.ones(n_labels), size=(2, 6, 6, 6)).astype(np.float32)

    expected = numpy_hard_dice(reference, predicted)
    np.testing.assert_allclose(hard_dice(reference, predicted).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(hard_dice(reference, reference).numpy(), 1.0)


def test_progress_log_writes_a_line_per_interval(caplog):
    from ltnet_tf.training.trainer import ProgressLog
    model = _model("voxelmorph", run_eagerly=True)
    scans = tf.data.Dataset.from_tensors(SCAN).repeat(3)
    with caplog.at_level("INFO"):
        model.fit(scans, epochs=1, verbose=0,
                  callbacks=[ProgressLog(model.g_optimizer, steps=3, interval_s=0.0)])
    lines = [r.getMessage() for r in caplog.records if "s/step" in r.getMessage()]
    assert [line.split(" (")[0] for line in lines] == ["step 2/3", "step 3/3"]
    assert "sim=" in lines[-1] and "g_loss=" in lines[-1]


def test_backward_generator_losses_train_only_g_b_and_cycle_terms_train_both():
    """back_sim/back_smooth are G_B's own registration losses (ū is data to them); the cycle
    terms supervise G_F and G_B through the composed displacement."""
    model = _model("ltnet", run_eagerly=True)
    forward_vars = model.forward_generator.trainable_variables
    backward_vars = model.backward_generator.trainable_variables
    # A non-zero forward displacement, so the cycle terms have something to say to G_F.
    last = model.forward_generator.get_layer("forward_generator_flow")
    last.bias.assign(np.full(3, 0.7, np.float32))
    with tf.GradientTape(persistent=True) as tape:
        terms, _, _ = model.generator_terms(tf.constant(SCAN), training=True)
    for name in ("back_sim", "back_smooth", "cyc_img", "cyc_label", "cyc_flow"):
        to_forward = [g for g in tape.gradient(terms[name], forward_vars) if g is not None]
        to_backward = [g for g in tape.gradient(terms[name], backward_vars) if g is not None]
        forward_norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in to_forward)
        backward_norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in to_backward)
        assert backward_norm > 0, name
        if name.startswith("back_"):
            assert forward_norm == 0, name
        else:
            assert forward_norm > 0, name
