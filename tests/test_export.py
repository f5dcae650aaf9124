"""Tests of ltnet_tf.serving.export: the TF Serving SavedModel, its clients, and G_F as a VoxelMorph .h5.

Two tiny run folders are written by hand in the layout of ``ltnet_tf.serving.modeldir`` (downsample 1 and 2,
grids that are neither cubic nor U-Net divisible) and exported once for the whole session
(``phantom_runs``, conftest.py: test_serving_doc uses the downsample-2 one too).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.commands import cli
from ltnet_tf.config import LTNetConfig, RefinementSettings
from ltnet_tf.io import labels, volumes as data
from ltnet_tf.registration.networks import ForwardGenerator
from ltnet_tf.registration.refinement import Refinement
from ltnet_tf.registration.transfer import LabelTransfer, resample_displacement
from ltnet_tf.serving import export
from ltnet_tf.serving.modeldir import ModelDir, ModelDirError

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

pytestmark = pytest.mark.slow  # SavedModels loaded and saved_model_cli run in fresh processes (CI runs -m slow too)

LABEL_IDS = [0, 2, 3, 17, 53]
GRIDS = {1: (18, 16, 14), 2: (20, 18, 16)}  # downsample -> atlas grid
AFFINE = np.array([[-1.0, 0, 0, 9.0], [0, 1, 0, -8.0], [0, 0, 1, -7.0], [0, 0, 0, 1]])
SUBPROCESS_TIMEOUT = 240
REFINED_STEPS = 3


# ------------------------------------------------------------------------------- a tiny trained run
def phantom(shape, seed):
    """(raw image, FreeSurfer label map): a head with white matter, cortex and two hippocampi."""
    rng = np.random.default_rng(seed)
    axes = [(np.arange(s) - (s - 1) / 2) / (s / 2) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    label_map = np.zeros(shape, np.int32)
    label_map[radius < 0.85] = 3
    label_map[radius < 0.6] = 2
    label_map[np.sqrt((x - 0.3) ** 2 + y ** 2 + (z + 0.2) ** 2) < 0.22] = 17
    label_map[np.sqrt((x + 0.3) ** 2 + y ** 2 + (z + 0.2) ** 2) < 0.22] = 53
    intensity = {0: 0.0, 2: 0.8, 3: 0.5, 17: 0.6, 53: 0.6}
    image = np.vectorize(intensity.get)(label_map) + 0.05 * rng.standard_normal(shape)
    return (1000 * image).astype(np.float32), label_map


def make_run(path, downsample: int, seed: int = 0) -> ModelDir:
    """A run folder as training leaves it: config, atlas copies and a checkpoint of G_F."""
    model_dir = ModelDir(path)
    os.makedirs(model_dir.path)
    config = LTNetConfig().replace(atlas_shape=list(GRIDS[downsample]), label_ids=LABEL_IDS,
                                   downsample=downsample, enc_features=[8, 8],
                                   dec_features=[8, 8, 8, 8], seed=seed)
    config.save(model_dir.config_path)
    atlas, atlas_labels = phantom(GRIDS[downsample], seed)
    data.save_nifti(atlas, AFFINE, model_dir.atlas_path)
    data.save_nifti(atlas_labels, AFFINE, model_dir.atlas_labels_path)

    tf.keras.utils.set_random_seed(seed)
    generator = ForwardGenerator.from_ltnet_config(config)
    # An untrained G_F predicts a displacement of ~0; make it a few voxels and spatially varying.
    flow_layer = generator.get_layer("forward_generator_flow")
    kernel, bias = flow_layer.get_weights()
    rng = np.random.default_rng(seed)
    flow_layer.set_weights([rng.normal(0.0, 0.3, kernel.shape).astype(np.float32),
                            rng.uniform(-1.5, 1.5, bias.shape).astype(np.float32)])
    tf.train.CheckpointManager(tf.train.Checkpoint(forward_generator=generator),
                               model_dir.checkpoint_dir, max_to_keep=3).save()
    return model_dir


def scans_for(shape, seed=1) -> np.ndarray:
    """Two scans [2, D, H, W, 1]: the phantom shifted and with another intensity range."""
    first, _ = phantom(shape, seed)
    second, _ = phantom(shape, seed + 1)
    scans = np.stack([np.roll(first, 1, axis=0) * 0.3 + 20, np.roll(second, -1, axis=2) * 2 - 50])
    return scans[..., None].astype(np.float32)


@dataclass
class Run:
    model_dir: ModelDir
    config: LTNetConfig
    paths: dict  # from export_all
    generator: tf.keras.Model
    atlas: np.ndarray
    atlas_labels: np.ndarray
    scans: np.ndarray
    expected: dict  # in-process LabelTransfer on `scans`
    other_atlas: np.ndarray
    other_labels: np.ndarray
    expected_register: dict  # in-process transfer_with_atlas(other atlas)
    expected_refined: np.ndarray  # in-process segment with REFINED_STEPS of refinement


    @property
    def saved_model(self) -> str:
        return self.paths["saved_model"]


def numpy_outputs(outputs) -> dict:
    return {name: np.asarray(value) for name, value in outputs.items()}


@pytest.fixture(scope="module")
def runs(phantom_runs):
    """The session's two exported phantom runs (conftest.py; shared with test_serving_doc, never
    changed here), with what the in-process model gives."""
    runs = {}
    for downsample, shape in GRIDS.items():
        model_dir, paths = phantom_runs[downsample]
        config = model_dir.load_config()
        generator = model_dir.restore_forward_generator(config)
        atlas, atlas_labels = model_dir.load_atlas()
        label_transfer = LabelTransfer(generator, config, atlas.data, atlas_labels.data)
        scans = scans_for(shape)
        other_atlas, other_labels = (np.flip(volume.data, axis=1).copy()
                                     for volume in (atlas, atlas_labels))
        runs[downsample] = Run(
            model_dir=model_dir, config=config, paths=paths, generator=generator,
            atlas=atlas.data, atlas_labels=atlas_labels.data, scans=scans,
            expected=numpy_outputs(label_transfer(tf.constant(scans))),
            other_atlas=other_atlas, other_labels=other_labels,
            expected_register=numpy_outputs(label_transfer.transfer_with_atlas(
                other_atlas, other_labels, tf.constant(scans))),
            expected_refined=label_transfer.segment(tf.constant(scans), refinement=(
                Refinement.for_label_transfer(label_transfer, factor=RefinementSettings().factor,
                                              steps=REFINED_STEPS, coarse_steps=0,
                                              jit_compile=export.REFINE_XLA)
            ))["segmentation"].numpy())
    return runs


def assert_outputs_match(actual: dict, expected: dict):
    assert sorted(actual) == sorted(export.OUTPUTS)
    np.testing.assert_array_equal(actual["segmentation"], expected["segmentation"])
    assert actual["segmentation"].dtype == np.int32
    np.testing.assert_allclose(actual["flow"], expected["flow"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(actual["warped_atlas"], expected["warped_atlas"], rtol=0, atol=1e-4)


def run_quietly(command, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                            **kwargs)
    assert result.returncode == 0, f"{command[:3]} failed:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


def serving_environment() -> dict:
    """The environment of a server: nothing of this project, and Keras left at TF's default."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TF_USE_LEGACY_KERAS")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


# ------------------------------------------------------------------------------- the run folder
def test_fixture_model_is_not_trivial(runs):
    for run in runs.values():
        assert np.abs(run.expected["flow"]).max() > 0.5
        moved = run.expected["segmentation"] != run.atlas_labels[None]
        assert 0 < moved.mean() < 0.9
        assert set(np.unique(run.expected["segmentation"])) <= set(LABEL_IDS)


def test_layout_version_folder_and_metadata(runs):
    run = runs[2]
    base = run.model_dir.saved_model_base
    assert run.saved_model == os.path.join(base, "1")
    assert run.paths["generator_h5"] == run.model_dir.generator_h5_path
    assert run.paths["checkpoint"] == run.model_dir.checkpoint("auto")
    assert os.listdir(base) == ["1"]  # no staging folder left behind
    assert not [n for n in os.listdir(run.model_dir.path) if n.startswith(".")]
    for name in ("saved_model.pb", "variables", export.METADATA_PATH):
        assert os.path.exists(os.path.join(run.saved_model, name))

    with open(os.path.join(run.saved_model, export.METADATA_PATH)) as f:
        metadata = json.load(f)
    assert metadata["atlas_shape"] == list(GRIDS[2])
    assert metadata["working_shape"] == list(run.config.working_shape()) == [12, 12, 8]
    assert metadata["downsample"] == 2
    assert metadata["label_ids"] == LABEL_IDS
    assert metadata["structure_names"] == {"0": "background", "2": "Left-Cerebral-White-Matter",
                                           "3": "Left-Cerebral-Cortex", "17": "Left-Hippocampus",
                                           "53": "Right-Hippocampus"}
    assert LTNetConfig.from_dict(metadata["ltnet_config"]) == run.config
    assert metadata["checkpoint"] == os.path.join("checkpoints", "ckpt-1")
    grid = list(GRIDS[2])
    assert metadata["signatures"]["serving_default"] == {
        "inputs": {"scan": {"dtype": "float32", "shape": [None, *grid, 1]}},
        "outputs": {"flow": {"dtype": "float32", "shape": [None, *grid, 3]},
                    "segmentation": {"dtype": "int32", "shape": [None, *grid]},
                    "warped_atlas": {"dtype": "float32", "shape": [None, *grid, 1]}}}
    assert metadata["signatures"]["displacement"] == {
        "inputs": {"scan": {"dtype": "float32", "shape": [None, *grid, 1]}},
        "outputs": {"flow_working": {"dtype": "float32",
                                     "shape": [None, *run.config.working_shape(), 3]}}}
    assert metadata["refinement"] == {
        "signature": "segment_refined", "factor": 2, "grid": [10, 9, 8], "learning_rate": 0.2,
        "weight_smooth": 4.0, "coarse_factor": 4, "recommended_steps": RefinementSettings().steps,
        "recommended_coarse_steps": RefinementSettings().coarse_steps, "xla": False}
    assert metadata["signatures"]["register"]["inputs"] == {
        "atlas": {"dtype": "float32", "shape": grid},
        "atlas_labels": {"dtype": "int32", "shape": grid},
        "scan": {"dtype": "float32", "shape": [None, *grid, 1]}}


# ------------------------------------------------------------------------------- clean process
CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    for case in json.loads(sys.argv[1]):
        model = tf.saved_model.load(case["saved_model"])
        inputs = np.load(case["inputs"])
        refined = {steps: model.signatures["segment_refined"](
            scan=tf.constant(inputs["scan"]), steps=tf.constant(steps),
            coarse_steps=tf.constant(0))["segmentation"].numpy()
            for steps in (0, case["refined_steps"])}
        if case["refined_only"]:
            np.savez(case["outputs"], refined_0=refined[0], refined=refined[case["refined_steps"]])
            continue
        outputs = model.signatures["serving_default"](scan=tf.constant(inputs["scan"]))
        registered = model.signatures["register"](
            atlas=tf.constant(inputs["atlas"]), atlas_labels=tf.constant(inputs["atlas_labels"]),
            scan=tf.constant(inputs["scan"]))
        segmented = model.signatures["segment"](scan=tf.constant(inputs["scan"]))
        displaced = model.signatures["displacement"](scan=tf.constant(inputs["scan"]))
        np.savez(case["outputs"], **{k: v.numpy() for k, v in outputs.items()},
                 **{"register_" + k: v.numpy() for k, v in registered.items()},
                 segment_segmentation=segmented["segmentation"].numpy(),
                 flow_working=displaced["flow_working"].numpy(), refined_0=refined[0], refined=refined[case["refined_steps"]])

    project = sorted(m for m in sys.modules
                     if m.split(".")[0] in ("ltnet_tf", "voxelmorph", "neurite"))
    assert not project, f"serving process imported {project}"
    print("CHILD_OK")
""")


@pytest.fixture(scope="module")
def xla_saved_model(runs, tmp_path_factory):
    """--refine_xla: the downsample-2 run exported again with the XLA-compiled refinement step."""
    model_dir = ModelDir(tmp_path_factory.mktemp("xla") / "run")
    shutil.copytree(runs[2].model_dir.path, model_dir.path)
    shutil.rmtree(model_dir.saved_model_base)
    return export.export_saved_model(model_dir, refine_xla=True)


@pytest.fixture(scope="module")
def clean_process(runs, xla_saved_model, tmp_path_factory):
    """Every signature of both runs' SavedModels, and the XLA export's segment_refined, called in
    ONE fresh process without the project (TensorFlow's start-up paid once): {case: outputs}."""
    folder = tmp_path_factory.mktemp("clean_process")
    saved_models = {downsample: run.saved_model for downsample, run in runs.items()}
    saved_models["xla"] = xla_saved_model
    cases = {}
    for key, saved_model in saved_models.items():
        run = runs[2 if key == "xla" else key]
        inputs = folder / f"inputs{key}.npz"
        np.savez(inputs, scan=run.scans, atlas=run.other_atlas, atlas_labels=run.other_labels)
        cases[key] = {"saved_model": saved_model, "inputs": str(inputs),
                      "outputs": str(folder / f"outputs{key}.npz"),
                      "refined_steps": REFINED_STEPS, "refined_only": key == "xla"}
    # cwd outside the repository, no PYTHONPATH: the project cannot even be imported by accident.
    result = run_quietly([sys.executable, "-c", CHILD, json.dumps(list(cases.values()))],
                         cwd=folder, env=serving_environment())
    assert "CHILD_OK" in result.stdout
    return {key: dict(np.load(case["outputs"])) for key, case in cases.items()}


def test_saved_model_in_clean_process_matches_in_process_model(runs, clean_process):
    for downsample, run in runs.items():
        outputs = clean_process[downsample]
        assert_outputs_match({k: outputs[k] for k in export.OUTPUTS}, run.expected)
        assert_outputs_match({k: outputs["register_" + k] for k in export.OUTPUTS},
                             run.expected_register)
        np.testing.assert_array_equal(outputs["segment_segmentation"], run.expected["segmentation"])
        # G_F's working-grid displacement alone: serving_default's flow once put on the full grid.
        assert outputs["flow_working"].shape[1:] == (*run.config.working_shape(), 3)
        np.testing.assert_allclose(
            resample_displacement(tf.constant(outputs["flow_working"]), run.config.downsample,
                                  run.config.atlas_shape).numpy(),
            run.expected["flow"], rtol=0, atol=1e-5)
        # Refinement inside the SavedModel: 0 steps is G_F's segmentation; a few steps give the
        # in-process refinement's (up to voxels on a vote tie after float differences).
        np.testing.assert_array_equal(outputs["refined_0"], run.expected["segmentation"])
        assert (run.expected_refined != run.expected["segmentation"]).mean() > 0.001
        assert (outputs["refined"] != run.expected_refined).mean() < 1e-3


def test_xla_refinement_signature_in_clean_process(runs, xla_saved_model, clean_process):
    """--refine_xla: the XLA-compiled step loads and runs with plain TensorFlow too."""
    with open(os.path.join(xla_saved_model, export.METADATA_PATH)) as f:
        assert json.load(f)["refinement"]["xla"] is True
    assert (clean_process["xla"]["refined"] != runs[2].expected_refined).mean() < 1e-3


def test_register_with_the_baked_in_atlas_equals_serving_default(runs):
    run = runs[1]
    model = tf.saved_model.load(run.saved_model)
    registered = model.signatures["register"](atlas=tf.constant(run.atlas),
                                              atlas_labels=tf.constant(run.atlas_labels),
                                              scan=tf.constant(run.scans))
    assert_outputs_match(numpy_outputs(registered), run.expected)


# ------------------------------------------------------------------------------- saved_model_cli
def saved_model_cli():
    path = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    return [path] if os.path.exists(path) else [sys.executable, "-m",
                                                 "tensorflow.python.tools.saved_model_cli"]


def parse_show_all(text: str) -> dict:
    """``saved_model_cli show --all`` -> {signature: {inputs|outputs: {name: (dtype, shape)}}};
    shape None: unknown rank."""
    signatures = {}
    blocks = re.split(r"^signature_def\['([^']+)'\]:$", text, flags=re.M)
    for name, block in zip(blocks[1::2], blocks[2::2]):
        tensors = {"inputs": {}, "outputs": {}}
        for kind, key, dtype, shape in re.findall(
                r"(inputs|outputs)\['([^']+)'\] tensor_info:\s+dtype: (\w+)\s+"
                r"shape: (\([^)]*\)|unknown_rank)", block):
            dims = None if shape == "unknown_rank" else tuple(
                int(s) for s in shape.strip("()").replace(" ", "").split(",") if s)
            tensors[kind][key] = (dtype, dims)
        signatures[name] = tensors
    return signatures


def test_saved_model_cli_show_and_run(runs, tmp_path):
    run = runs[2]
    grid = GRIDS[2]
    shown = run_quietly(saved_model_cli() + ["show", "--dir", run.saved_model, "--all"],
                        env=serving_environment()).stdout
    signatures = parse_show_all(shown)
    # Inputs of any shape, checked inside the signature (test_wrong_inputs_*); outputs static.
    assert signatures["serving_default"] == {
        "inputs": {"scan": ("DT_FLOAT", None)},
        "outputs": {"segmentation": ("DT_INT32", (-1, *grid)),
                    "flow": ("DT_FLOAT", (-1, *grid, 3)),
                    "warped_atlas": ("DT_FLOAT", (-1, *grid, 1))}}
    assert signatures["register"]["inputs"] == {
        "atlas": ("DT_FLOAT", None), "atlas_labels": ("DT_INT32", None),
        "scan": ("DT_FLOAT", None)}
    assert signatures["register"]["outputs"] == signatures["serving_default"]["outputs"]
    assert signatures["segment"] == {
        "inputs": {"scan": ("DT_FLOAT", None)},
        "outputs": {"segmentation": ("DT_INT32", (-1, *grid))}}
    assert signatures["segment_refined"] == {
        "inputs": {"scan": ("DT_FLOAT", None), "steps": ("DT_INT32", None),
                   "coarse_steps": ("DT_INT32", None)},
        "outputs": {"segmentation": ("DT_INT32", (-1, *grid))}}
    assert signatures["displacement"]["outputs"] == {
        "flow_working": ("DT_FLOAT", (-1, *run.config.working_shape(), 3))}
    assert "PyFunc" not in shown and "EagerPyFunc" not in shown

    # One run, fed float64: saved_model_cli's session casts another dtype to the signature's
    # float32, and every output is the in-process model's. (A float32 scan.npy through
    # saved_model_cli run is the docs/serving.md block that test_serving_doc runs as written.)
    scan_path, out_dir = tmp_path / "scan64.npy", tmp_path / "out"
    np.save(scan_path, run.scans[:1].astype(np.float64))
    run_quietly(saved_model_cli() + ["run", "--dir", run.saved_model, "--tag_set", "serve",
                                     "--signature_def", "serving_default",
                                     "--inputs", f"scan={scan_path}", "--outdir", str(out_dir)],
                env=serving_environment())
    written = {name: np.load(out_dir / f"{name}.npy") for name in export.OUTPUTS}
    assert_outputs_match(written, {k: v[:1] for k, v in run.expected.items()})


# ------------------------------------------------------------------------------- wrong inputs
# The messages in full, written out here (not taken from ltnet_tf) so that a change is seen.
SCAN_MESSAGE = ("scan must be [batch, 20, 18, 16, 1] float32 raw intensities on the atlas grid, "
                "not of shape [{}]: align it to the atlas and resample it onto the atlas grid "
                "first (docs/serving.md)")
WRONG_SCANS = {"native 256^3": (1, 256, 256, 256, 1), "no channel axis": (1, 20, 18, 16),
               "no batch axis": (20, 18, 16, 1), "rank 6": (1, 1, 20, 18, 16, 1),
               "other grid": (2, 16, 18, 20, 1)}


def scan_message(shape) -> str:
    return SCAN_MESSAGE.format(" ".join(str(s) for s in shape))


WRONG_INPUTS_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf

    saved_model, cases = sys.argv[1], json.loads(sys.argv[2])
    signatures = tf.saved_model.load(saved_model).signatures
    right = {"scan": np.zeros([1, 20, 18, 16, 1], np.float32), "steps": np.int32(1),
             "coarse_steps": np.int32(0), "atlas": np.zeros([20, 18, 16], np.float32),
             "atlas_labels": np.zeros([20, 18, 16], np.int32)}
    messages = {}
    for key, (signature, name, shape, dtype) in cases.items():
        inputs = signatures[signature].structured_input_signature[1]
        feed = {n: tf.constant(right[n]) for n in inputs}
        feed[name] = tf.zeros(shape, dtype)
        try:
            signatures[signature](**feed)
            messages[key] = None
        except tf.errors.InvalidArgumentError as e:
            messages[key] = str(e)
    print(json.dumps(messages))
""")


def test_wrong_inputs_are_named_with_the_fix_in_a_clean_process(runs, tmp_path):
    """``tf.saved_model.load`` signatures in a process without ltnet_tf: every signature checks
    its inputs first, so a scan of the wrong shape never reaches the network's ops."""
    cases = {f"{signature} {what}": (signature, "scan", shape, "float32")
             for signature in ("serving_default", "segment", "displacement", "register",
                               "segment_refined") for what, shape in WRONG_SCANS.items()}
    cases.update({
        "register atlas": ("register", "atlas", [20, 18, 17], "float32"),
        "register atlas_labels": ("register", "atlas_labels", [1, 20, 18, 16], "int32"),
        "segment_refined steps": ("segment_refined", "steps", [1], "int32"),
        "segment_refined coarse_steps": ("segment_refined", "coarse_steps", [2, 1], "int32"),
        "float64 scan": ("segment", "scan", [1, 20, 18, 16, 1], "float64"),
    })
    result = run_quietly([sys.executable, "-c", WRONG_INPUTS_CHILD, runs[2].saved_model,
                          json.dumps(cases)], cwd=tmp_path, env=serving_environment())
    messages = json.loads(result.stdout.strip().splitlines()[-1])
    for key, (_, name, shape, _) in cases.items():
        message = messages[key]
        assert message is not None, f"{key}: accepted"
        if name == "scan" and key != "float64 scan":
            assert f"assertion failed: [{scan_message(shape)}]" in message, (key, message)
            assert "ConcatOp" not in message and "reduction" not in message
    expected = {
        "register atlas": "atlas must be [20, 18, 16] float32 raw intensities (another atlas, "
                          "same grid), not of shape [20 18 17]: resample it onto the atlas grid "
                          "first (docs/serving.md)",
        "register atlas_labels": "atlas_labels must be [20, 18, 16] int32 label IDs of that "
                                 "atlas, not of shape [1 20 18 16]: resample them onto the atlas "
                                 "grid first (nearest label) (docs/serving.md)",
        "segment_refined steps": "steps must be a scalar int32 number of refinement steps, not "
                                 "of shape [1]: send one number, e.g. 10 (docs/serving.md)",
        "segment_refined coarse_steps": "coarse_steps must be a scalar int32 number of "
                                        "refinement steps, not of shape [2 1]: send one number, "
                                        "e.g. 10 (docs/serving.md)"}
    for key, text in expected.items():
        assert f"assertion failed: [{text}]" in messages[key], (key, messages[key])
    # The dtype is the signature's own, checked by TensorFlow before the graph runs.
    assert "was expected to be a float tensor but is a double tensor" in messages["float64 scan"]


def saved_model_cli_run(saved_model, signature, out_dir, *inputs):
    """``saved_model_cli run`` in a fresh process; returns the finished process."""
    return subprocess.run(saved_model_cli() + ["run", "--dir", saved_model, "--tag_set", "serve",
                                               "--signature_def", signature, "--outdir",
                                               str(out_dir), "--overwrite", *inputs],
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                          env=serving_environment())


def literal(shape) -> str:
    """A Python literal of an array of ``shape`` (``--input_exprs`` takes literals only)."""
    return json.dumps(np.full(shape, 0.5).tolist())


def test_wrong_inputs_through_saved_model_cli(runs, tmp_path):
    """``saved_model_cli run`` feeds the graph through a session, as TF Serving does: the shape
    check is the graph's assertion, not a Python one. One run per assertion (the scan's, fed from
    a file; a refinement budget's, fed as a literal): each process pays TensorFlow's start-up.
    Every signature's scan check, with every wrong shape, is
    test_wrong_inputs_are_named_with_the_fix_in_a_clean_process's; another dtype fed through
    saved_model_cli is test_saved_model_cli_show_and_run's run."""
    run = runs[2]
    native = tmp_path / "native.npy"
    np.save(native, np.zeros([1, 256, 256, 256, 1], np.float32))
    cases = [("segment", ["--inputs", f"scan={native}"], scan_message([1, 256, 256, 256, 1])),
             ("segment_refined", ["--input_exprs", f"scan={literal([1, 20, 18, 16, 1])};"
                                  f"steps=[3];coarse_steps=0"],
              "steps must be a scalar int32 number of refinement steps, not of shape [1]: "
              "send one number, e.g. 10 (docs/serving.md)")]
    for signature, inputs, message in cases:
        result = saved_model_cli_run(run.saved_model, signature, tmp_path / "out", *inputs)
        assert result.returncode != 0, (signature, result.stdout[-2000:])
        assert f"assertion failed: [{message}]" in result.stderr, (signature,
                                                                   result.stderr[-3000:])


# ------------------------------------------------------------------------------- TF Serving clients
@pytest.fixture(scope="module")
def served(runs):
    """The serving_default signature of the downsample-2 export, loaded as a server would."""
    run = runs[2]
    return run, tf.saved_model.load(run.saved_model).signatures["serving_default"]


def check_accepts(signature, array: np.ndarray, saved_model: str):
    """The signature's input, as its metadata JSON says a client must send it, is exactly this
    tensor; returns the signature's outputs."""
    args, kwargs = signature.structured_input_signature
    assert not args and list(kwargs) == [export.SCAN_INPUT]
    with open(os.path.join(saved_model, export.METADATA_PATH)) as f:
        expected = json.load(f)["signatures"]["serving_default"]["inputs"][export.SCAN_INPUT]
    spec = tf.TensorSpec(expected["shape"], expected["dtype"])
    assert array.dtype == spec.dtype.as_numpy_dtype == kwargs[export.SCAN_INPUT].dtype
    assert spec.is_compatible_with(tf.TensorSpec.from_tensor(tf.constant(array)))
    return numpy_outputs(signature(**{export.SCAN_INPUT: tf.constant(array)}))


def test_rest_request_bodies(served):
    run, signature = served
    scan = run.scans[0]  # one scan [D, H, W, 1], raw intensities
    bodies = {
        # row form: one instance per scan, without the batch axis
        "instances": json.dumps({"signature_name": "serving_default",
                                 "instances": [scan.tolist()]}),
        # columnar form: named inputs, with the batch axis
        "inputs": json.dumps({"signature_name": "serving_default",
                              "inputs": {"scan": scan[None].tolist()}}),
    }
    for form, body in bodies.items():
        request = json.loads(body)
        assert request["signature_name"] == export.SERVING_SIGNATURE
        values = request[form] if form == "instances" else request[form][export.SCAN_INPUT]
        array = np.asarray(values, dtype=np.float32)
        np.testing.assert_array_equal(array, scan[None])  # JSON round trip is exact for float32
        outputs = check_accepts(signature, array, run.saved_model)
        assert_outputs_match(outputs, {k: v[:1] for k, v in run.expected.items()})
        json.dumps({"predictions": [{k: v[0].tolist() for k, v in outputs.items()}]})


def test_grpc_predict_request(served, tmp_path):
    """The client of docs/serving.md, with the server replaced by the loaded signature."""
    import grpc
    import nibabel as nib
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    run, signature = served
    scan_path = tmp_path / "scan.nii.gz"
    data.save_nifti(run.scans[0, ..., 0], AFFINE, scan_path)
    image = nib.load(scan_path)
    scan = image.get_fdata(dtype=np.float32)[None, ..., None]
    np.testing.assert_array_equal(scan, run.scans[:1])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ltnet"
    request.model_spec.signature_name = "serving_default"
    request.inputs["scan"].CopyFrom(tf.make_tensor_proto(scan))
    request.output_filter.append("segmentation")

    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert received.inputs["scan"].dtype == tf.float32.as_datatype_enum
    assert [d.size for d in received.inputs["scan"].tensor_shape.dim] == [1, *GRIDS[2], 1]
    outputs = check_accepts(signature, tf.make_ndarray(received.inputs["scan"]), run.saved_model)
    assert_outputs_match(outputs, {k: v[:1] for k, v in run.expected.items()})

    response = predict_pb2.PredictResponse()
    for name in received.output_filter:
        response.outputs[name].CopyFrom(tf.make_tensor_proto(outputs[name]))
    response = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    assert list(response.outputs) == ["segmentation"]
    segmentation = tf.make_ndarray(response.outputs["segmentation"])[0]
    np.testing.assert_array_equal(segmentation, run.expected["segmentation"][0])
    output = nib.Nifti1Image(segmentation.astype(np.int16), image.affine, image.header)
    output.set_data_dtype(np.int16)
    nib.save(output, tmp_path / "scan_seg.nii.gz")
    np.testing.assert_array_equal(data.load_label_map(tmp_path / "scan_seg.nii.gz").data,
                                  run.expected["segmentation"][0])

    channel = grpc.insecure_channel("localhost:8500", options=[  # lazy: connects on first call
        ("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)])
    assert callable(prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict)
    channel.close()


# ------------------------------------------------------------------------------- VoxelMorph .h5
def normalize_numpy(volume, max_samples=2 ** 18):
    """The normalisation of docs/serving.md's recipe, as printed there."""
    volume = np.asarray(volume, np.float32)
    sample = volume.ravel()[::-(-volume.size // max_samples)]
    values, counts = np.unique(sample, return_counts=True)
    background = values[counts.argmax()] if counts.max() >= 0.1 * sample.size else None
    tissue = sample if background is None else sample[sample != background]
    if tissue.size == 0:
        return np.zeros_like(volume)
    q1, q3 = np.percentile(tissue, [25, 75])
    if q3 > q1:
        tissue = tissue[(tissue >= q1 - 3 * (q3 - q1)) & (tissue <= q3 + 3 * (q3 - q1))]
    low, high = np.percentile(tissue, [0.5, 99.5])
    if high <= low and background is not None:
        low = background
    scaled = (volume - low) / (high - low) if high != low else np.zeros_like(volume)
    normalized = np.where(scaled > 4.0, 0.0, np.clip(scaled, 0.0, 1.0))
    if background is not None:
        normalized[volume == background] = 0.0
    return normalized.astype(np.float32)


def working_grid_numpy(volume: np.ndarray, working_shape, factor: int) -> np.ndarray:
    """The recipe of docs/serving.md for VoxelMorph users: normalise, zero-pad the end, mean-pool."""
    volume = normalize_numpy(volume)
    padded = np.zeros([s * factor for s in working_shape], np.float32)
    padded[:volume.shape[0], :volume.shape[1], :volume.shape[2]] = volume
    d, h, w = working_shape
    return padded.reshape(d, factor, h, factor, w, factor).mean(axis=(1, 3, 5))[None, ..., None]


@pytest.mark.parametrize("downsample", sorted(GRIDS))
def test_generator_h5_loads_in_voxelmorph(runs, downsample):
    import voxelmorph as vxm

    run = runs[downsample]
    model = vxm.networks.VxmDense.load(run.paths["generator_h5"])
    assert type(model) is vxm.networks.VxmDense
    assert tuple(model.inputs[0].shape[1:-1]) == run.config.working_shape()

    to_working = lambda volume: data.to_working_grid(  # noqa: E731
        data.normalize_intensity(tf.constant(volume[None, ..., None])), run.config).numpy()
    atlas, scan = to_working(run.atlas), to_working(run.scans[0, ..., 0])
    warped, flow = model([atlas, scan])
    expected_warped, expected_flow = run.generator([atlas, scan])
    np.testing.assert_array_equal(flow.numpy(), expected_flow.numpy())
    np.testing.assert_array_equal(warped.numpy(), expected_warped.numpy())
    assert np.abs(flow.numpy()).max() > 0.1

    # What docs/serving.md shows: numpy preprocessing, model.register, SpatialTransformer.
    factor, working_shape = run.config.downsample, model.inputs[0].shape[1:-1]
    atlas_np = working_grid_numpy(run.atlas, working_shape, factor)
    scan_np = working_grid_numpy(run.scans[0, ..., 0], working_shape, factor)
    np.testing.assert_allclose(atlas_np, atlas, atol=1e-6)
    np.testing.assert_allclose(scan_np, scan, atol=1e-6)
    predicted_warped, predicted_flow = model.predict([atlas_np, scan_np], verbose=0)
    np.testing.assert_allclose(predicted_flow, expected_flow.numpy(), atol=1e-4)
    np.testing.assert_allclose(predicted_warped, expected_warped.numpy(), atol=1e-4)
    flow_np = model.register(atlas_np, scan_np)
    np.testing.assert_allclose(flow_np, expected_flow.numpy(), atol=1e-4)
    warped_np = vxm.layers.SpatialTransformer()([atlas_np, flow_np]).numpy()
    np.testing.assert_allclose(warped_np, expected_warped.numpy(), atol=1e-4)
    if factor == 1:  # labels on the working grid need no pooling when it is the atlas grid
        labels_np = np.zeros(working_shape, np.float32)
        labels_np[tuple(slice(0, s) for s in run.atlas_labels.shape)] = run.atlas_labels
        warped_labels = vxm.layers.SpatialTransformer(interp_method="nearest")(
            [labels_np[None, ..., None], flow_np]).numpy()
        assert set(np.unique(warped_labels).astype(int)) <= set(LABEL_IDS)


def test_voxelmorph_register_script_path_after_import_ltnet_tf(runs, tmp_path):
    """What VoxelMorph's ``scripts/tf/register.py`` does with a run's generator.h5, in a fresh
    process: volumes read by ``vxm.py.utils.load_volfile`` (nibabel's ``get_data()``, restored by
    ``import ltnet_tf``), ``VxmDense.load(...).register``, ``Transform``, ``save_volfile``."""
    run = runs[1]
    to_working = lambda volume: data.to_working_grid(  # noqa: E731
        data.normalize_intensity(tf.constant(volume[None, ..., None])), run.config).numpy()
    atlas, scan = to_working(run.atlas), to_working(run.scans[0, ..., 0])
    _, expected_flow = run.generator([atlas, scan])
    moving, fixed = tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz"
    for path, volume in ((moving, atlas), (fixed, scan)):
        nib.save(nib.Nifti1Image(volume[0, ..., 0], np.eye(4)), str(path))
    script = textwrap.dedent(f"""
        import sys
        import ltnet_tf
        import numpy as np
        import voxelmorph as vxm
        moving = vxm.py.utils.load_volfile({str(moving)!r}, add_batch_axis=True, add_feat_axis=True)
        fixed, fixed_affine = vxm.py.utils.load_volfile(
            {str(fixed)!r}, add_batch_axis=True, add_feat_axis=True, ret_affine=True)
        inshape = moving.shape[1:-1]
        warp = vxm.networks.VxmDense.load({run.paths["generator_h5"]!r}, input_model=None
                                          ).register(moving, fixed)
        moved = vxm.networks.Transform(inshape, nb_feats=1).predict([moving, warp], verbose=0)
        vxm.py.utils.save_volfile(moved.squeeze(), {str(tmp_path / "moved.nii.gz")!r}, fixed_affine)
        np.save({str(tmp_path / "warp.npy")!r}, warp)
    """)
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": repository})
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(np.load(tmp_path / "warp.npy"), expected_flow.numpy(), atol=1e-4)
    assert nib.load(str(tmp_path / "moved.nii.gz")).shape == atlas.shape[1:-1]


# ------------------------------------------------------------------------------- failures and CLI
@pytest.fixture
def run_copy(runs, tmp_path):
    """A private copy of the downsample-1 run, which a test may change."""
    path = tmp_path / "RUN"
    shutil.copytree(runs[1].model_dir.path, path)
    return ModelDir(path)


@pytest.mark.parametrize("enc_features", [[16, 16], [8, 8, 8]])
def test_checkpoint_not_matching_config_fails_loudly(run_copy, capsys, enc_features):
    config = run_copy.load_config().replace(enc_features=enc_features)
    config.save(run_copy.config_path)
    with pytest.raises(ModelDirError) as error:
        export.export_saved_model(run_copy)
    message = str(error.value)
    assert "\n" not in message and "does not match" in message and "config.json" in message
    assert run_copy.saved_model_versions() == [1]
    assert sorted(os.listdir(run_copy.saved_model_base)) == ["1"]

    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path]) == 1
    stderr = capsys.readouterr().err.strip()
    assert stderr.count("\n") == 0 and "does not match" in stderr


def test_versions_and_command_line(run_copy, capsys):
    base = run_copy.saved_model_base
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path, "--checkpoint", "last"]) == 0
    assert f"SavedModel: {os.path.join(base, '2')}" in capsys.readouterr().out
    assert run_copy.saved_model_versions() == [1, 2]
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path, "--version", "7"]) == 0
    assert run_copy.latest_saved_model() == os.path.join(base, "7")

    with pytest.raises(ModelDirError, match="refusing to overwrite"):
        export.export_saved_model(run_copy, version=2)
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path, "--version", "7"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(base)) == ["1", "2", "7"]  # nothing half-written left

    for argv in (["--model_dir", str(run_copy.path) + "-missing"], [], ["--checkpoint", "newest"],
                 ["--model_dir", run_copy.path, "--checkpoint", "best"]):
        assert cli.export_main(["ltnet-export", *argv]) == 1, argv
        stderr = capsys.readouterr().err.strip()
        assert stderr.startswith("ltnet-export: error:") and "\n" not in stderr, stderr


def test_bad_atlas_copy_is_a_one_line_error(run_copy, capsys):
    with open(run_copy.atlas_path, "wb") as f:
        f.write(b"not a nifti")
    assert cli.export_main(["ltnet-export", "--model_dir", run_copy.path]) == 1
    stderr = capsys.readouterr().err.strip()
    assert "atlas.nii.gz" in stderr and "\n" not in stderr
    assert sorted(os.listdir(run_copy.saved_model_base)) == ["1"]
    assert not [n for n in os.listdir(run_copy.path) if n.startswith(".")]


def test_structure_names():
    assert len(labels.BENCHMARK_LABELS) == len(set(labels.BENCHMARK_LABELS)) == 28
    assert all(i in labels.FREESURFER_NAMES for i in labels.BENCHMARK_LABELS)
    assert labels.structure_name(0) == "background"
    assert labels.structure_name(17) == "Left-Hippocampus"
    assert labels.structure_name(np.int32(60)) == "Right-VentralDC"
    assert labels.structure_name(9999) == "label 9999"
