"""The code blocks of docs/serving.md run as written.

Every ``python`` and ``bash`` block of the page carries a marker comment,
``<!-- doc-test: NAME -->`` or ``<!-- doc-test: NAME needs-server -->``. The first kind run in page
order, each in a fresh process, in a folder holding a tiny exported run (``models/RUN``) and a scan
on its atlas grid (``scan.nii.gz``); what each one wrote is then compared with the in-process
model. Python blocks run as a client would: no ``PYTHONPATH``, ``TF_USE_LEGACY_KERAS`` unset, and ``ltnet_tf`` never
imported; bash blocks run with this repository's ``ltnet_tf`` and the environment's
``saved_model_cli``. Blocks that need TF Serving are compiled (Python) or parsed (``bash -n``), and
the gRPC request they send is checked with the official ``tensorflow-serving-api`` protos.
"""
import ast
import builtins
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import pytest

from ltnet_tf.io import volumes as data
from ltnet_tf.registration.transfer import LabelTransfer
from ltnet_tf.serving import export
from ltnet_tf.serving.modeldir import ModelDir
from test_export import (AFFINE, GRIDS, SUBPROCESS_TIMEOUT, assert_outputs_match, scans_for,
                         serving_environment)

import tensorflow as tf  # noqa: E402  (after ltnet_tf, which selects Keras 2)

pytestmark = pytest.mark.slow  # runs the serving guide's code blocks in fresh processes (CI runs -m slow too)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "serving.md")
DOWNSAMPLE = 2
# Appended to a block after it ran as written: what the test compares.
EPILOGUES = {
    "grpc-request": 'open("grpc_request.pb", "wb").write(request.SerializeToString())',
    "voxelmorph": 'np.savez("voxelmorph.npz", warped_atlas=warped_atlas, flow=flow, warped=warped)',
}
CLIENT_CHECK = ('import sys\nassert not [m for m in sys.modules if m.split(".")[0] == "ltnet_tf"]'
                ', "imported ltnet_tf"')


@dataclass
class Block:
    name: str
    language: str
    code: str
    line: int  # of the opening fence
    needs_server: bool


def code_blocks(path=DOC) -> list:
    """Every fenced block: its marker (None without one), language and code."""
    blocks, marker, lines = [], None, open(path).read().splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        found = re.fullmatch(r"<!-- doc-test: (\S+)( needs-server)? -->", line.strip())
        if found:
            marker = found
        elif line.startswith("```"):
            end = lines.index("```", index + 1)
            blocks.append(Block(marker.group(1) if marker else None, line[3:].strip(),
                                "\n".join(lines[index + 1:end]), index + 1,
                                bool(marker and marker.group(2))))
            marker, index = None, end
        elif line.strip():
            marker = None  # a marker belongs to the block right after it
        index += 1
    return blocks


def runnable(language) -> list:
    return [b for b in code_blocks() if b.language == language]


# ------------------------------------------------------------------------------- the folder
@pytest.fixture(scope="module")
def folder(phantom_runs, tmp_path_factory):
    """``models/RUN`` exported (a copy of the session's phantom run, conftest.py: the page's
    export block adds a version to it), ``scan.nii.gz`` on its atlas grid, and what the model
    gives."""
    root = tmp_path_factory.mktemp("serving_doc")
    shutil.copytree(phantom_runs[DOWNSAMPLE][0].path, root / "models" / "RUN")
    model_dir = ModelDir(str(root / "models" / "RUN"))
    scan = scans_for(GRIDS[DOWNSAMPLE])[0, ..., 0]
    data.save_nifti(scan, AFFINE, root / "scan.nii.gz")
    config = model_dir.load_config()
    generator = model_dir.restore_forward_generator(config)
    atlas, atlas_labels = model_dir.load_atlas()
    label_transfer = LabelTransfer(generator, config, atlas.data, atlas_labels.data)
    expected = {k: v.numpy() for k, v in label_transfer(tf.constant(scan[None, ..., None])).items()}
    to_working = lambda volume: data.to_working_grid(  # noqa: E731
        data.normalize_intensity(tf.constant(volume[None, ..., None])), config).numpy()
    warped_atlas, flow = generator([to_working(atlas.data), to_working(scan)])
    return {"root": root, "model_dir": model_dir, "scan": scan, "expected": expected,
            "voxelmorph": {"warped_atlas": warped_atlas.numpy(), "flow": flow.numpy()}}


def run_block(block: Block, cwd):
    if block.language == "python":
        command = [sys.executable, "-c",
                   "\n".join([block.code, EPILOGUES.get(block.name, ""), CLIENT_CHECK])]
        env = serving_environment()
    else:
        command = ["bash", "-e", "-c", block.code]
        env = {**serving_environment(), "PYTHONPATH": REPO,
               "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, (f"docs/serving.md:{block.line} ({block.name}) failed:\n"
                                    f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}")


# ------------------------------------------------------------------------------- tests
def test_every_code_block_is_run_or_marked():
    blocks = [b for b in code_blocks() if b.language in ("python", "bash")]
    assert [b.line for b in blocks if b.name is None] == []
    names = [b.name for b in blocks]
    assert len(names) == len(set(names)), names
    # The blocks checked below; a new block needs its check here.
    assert names == ["export", "scan-npy", "saved-model-cli", "tf-serving", "rest-request",
                     "rest-send", "grpc-request", "grpc-send", "voxelmorph"]
    assert {b.name for b in blocks if b.needs_server} == {"tf-serving", "rest-send", "grpc-send"}


def test_code_blocks_run_as_written(folder):
    root, model_dir, expected = folder["root"], folder["model_dir"], folder["expected"]
    for block in code_blocks():
        if block.language in ("python", "bash") and not block.needs_server:
            run_block(block, root)
    signature = tf.saved_model.load(model_dir.latest_saved_model()).signatures["serving_default"]

    # export: a second version, from the last checkpoint
    assert model_dir.saved_model_versions() == [1, 2]
    with open(os.path.join(model_dir.latest_saved_model(), export.METADATA_PATH)) as f:
        assert json.load(f)["checkpoint"] == os.path.join("checkpoints", "ckpt-1")

    # scan-npy, saved-model-cli
    np.testing.assert_array_equal(np.load(root / "scan.npy"), folder["scan"][None, ..., None])
    assert_outputs_match({name: np.load(root / "out" / f"{name}.npy") for name in export.OUTPUTS},
                         expected)

    # rest-request: the row form, one instance without the batch axis
    with open(root / "request.json") as f:
        request = json.load(f)
    assert sorted(request) == ["instances", "signature_name"]
    assert request["signature_name"] == export.SERVING_SIGNATURE
    instances = np.asarray(request["instances"], np.float32)
    np.testing.assert_array_equal(instances, folder["scan"][None, ..., None])
    assert_outputs_match({k: v.numpy() for k, v in signature(scan=tf.constant(instances)).items()},
                         expected)

    # grpc-request: a valid PredictRequest for the served signature
    from tensorflow_serving.apis import predict_pb2

    with open(root / "grpc_request.pb", "rb") as f:
        grpc_request = predict_pb2.PredictRequest.FromString(f.read())
    assert grpc_request.model_spec.name == "ltnet"
    assert grpc_request.model_spec.signature_name == export.SERVING_SIGNATURE
    assert list(grpc_request.inputs) == [export.SCAN_INPUT]
    assert set(grpc_request.output_filter) <= set(export.OUTPUTS)
    tensor = grpc_request.inputs[export.SCAN_INPUT]
    with open(os.path.join(model_dir.latest_saved_model(), export.METADATA_PATH)) as f:
        sent = json.load(f)["signatures"]["serving_default"]["inputs"][export.SCAN_INPUT]
    assert tensor.dtype == tf.as_dtype(sent["dtype"]).as_datatype_enum
    assert [d.size for d in tensor.tensor_shape.dim] == [1, *sent["shape"][1:]]
    outputs = signature(scan=tf.constant(tf.make_ndarray(tensor)))
    np.testing.assert_array_equal(outputs["segmentation"].numpy(), expected["segmentation"])

    # voxelmorph: G_F's outputs, and the SpatialTransformer's warp equals the network's
    written = np.load(root / "voxelmorph.npz")
    for name in ("warped_atlas", "flow"):
        np.testing.assert_allclose(written[name], folder["voxelmorph"][name], atol=1e-4)
    np.testing.assert_allclose(written["warped"], written["warped_atlas"], atol=1e-4)
    assert np.abs(written["flow"]).max() > 0.1


def _names(tree) -> tuple:
    """(names a module binds, names it reads)."""
    bound, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name):
            (bound if isinstance(node.ctx, ast.Store) else read).add(node.id)
    return bound, read


def test_blocks_that_need_a_server_are_valid_code(tmp_path):
    blocks = {b.name: b for b in code_blocks()}
    for block in blocks.values():
        if not block.needs_server:
            continue
        if block.language == "python":
            compile(block.code, f"docs/serving.md:{block.line}", "exec")
        else:
            result = subprocess.run(["bash", "-n", "-c", block.code], capture_output=True,
                                    text=True, timeout=SUBPROCESS_TIMEOUT)
            assert result.returncode == 0, (block.name, result.stderr)
    # grpc-send continues grpc-request: everything it reads is bound by one of the two.
    request_bound, _ = _names(ast.parse(blocks["grpc-request"].code))
    send_bound, send_read = _names(ast.parse(blocks["grpc-send"].code))
    unbound = send_read - request_bound - send_bound - set(dir(builtins))
    assert not unbound, unbound
    # and reads what it is sent back as the doc says: the reply of the Predict call
    assert "request" in send_read and "Predict" in blocks["grpc-send"].code


def blocks_after_call(blocks, name, call) -> str:
    """The lines of block ``name`` after the one that contains ``call``."""
    lines = next(b for b in blocks if b.name == name).code.splitlines()
    index = next(i for i, line in enumerate(lines) if call in line)
    return "\n".join(lines[index + 1:])


def test_reading_the_segmentation_back_as_the_grpc_block_writes_it(folder, tmp_path):
    """The end of grpc-send (reply -> NIfTI beside the scan), on a reply built from the model's
    segmentation with the official PredictResponse: header, affine and labels survive."""
    from tensorflow_serving.apis import predict_pb2

    response = predict_pb2.PredictResponse()
    response.outputs["segmentation"].CopyFrom(
        tf.make_tensor_proto(folder["expected"]["segmentation"]))
    response = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    code = blocks_after_call(code_blocks(), "grpc-send", "stub.Predict(")
    namespace = {"response": response, "image": nib.load(folder["root"] / "scan.nii.gz")}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile("import nibabel as nib\nimport numpy as np\nimport tensorflow as tf\n" + code,
                     "docs/serving.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    written = nib.load(tmp_path / "scan_seg.nii.gz")
    np.testing.assert_array_equal(np.asarray(written.dataobj), folder["expected"]["segmentation"][0])
    np.testing.assert_array_equal(written.affine, AFFINE)
