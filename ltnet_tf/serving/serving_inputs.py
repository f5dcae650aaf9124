"""What a client of the SavedModel must send, checked at the top of every signature.

A scan on the wrong grid (a 256³ scan not aligned to the atlas) or without the channel axis
otherwise fails deep inside the network ("ConcatOp : Dimension 1 in both shapes must be equal",
"Invalid reduction dimension"). TF Serving and ``saved_model_cli`` feed the graph directly, without
the Python-side shape check of a ``tf.function``, so the check is in the graph: a ``tf.debugging``
assertion (standard ops, which TF Serving runs) whose message names the expected shape and the fix.

For the assertion to be what the client sees, the signature declares each input with its dtype
and no shape at all (any rank): a static shape would let ``saved_model_cli``'s session refuse the
feed first ("Cannot feed value of shape ..."), and would let TensorFlow fold the check away. After
the assertion, the tensor gets its static shape back, so the rest of the graph, and every output,
is what it was with a static input signature.

The dtype stays in the signature: TensorFlow itself refuses another one (``tf.saved_model.load``:
"expected to be a float tensor but is a double tensor"; TF Serving: "Expects arg[0] to be float
but double is provided"); ``saved_model_cli`` casts numbers to it.
"""
from __future__ import annotations

from ltnet_tf import compat  # noqa: F401

import dataclasses

import tensorflow as tf

SERVING_DOC = "docs/serving.md"


@dataclasses.dataclass(frozen=True)
class ServingInput:
    """One named input of a signature: ``shape`` with None for any size (the batch)."""
    name: str
    shape: tuple
    dtype: tf.DType
    what: str  # what the values are, e.g. "raw intensities on the atlas grid"
    fix: str  # what to do about a wrong shape

    @property
    def signature_spec(self) -> tf.TensorSpec:
        """What the signature declares: the dtype, any shape (checked inside)."""
        return tf.TensorSpec(None, self.dtype, name=self.name)

    @property
    def expected_spec(self) -> tf.TensorSpec:
        """What a client must send (for the metadata JSON)."""
        return tf.TensorSpec(self.shape, self.dtype, name=self.name)

    def shape_text(self) -> str:
        dims = ["batch" if d is None else str(d) for d in self.shape]
        return f"[{', '.join(dims)}]" if dims else "a scalar"

    def message(self, shape: str = None) -> str:
        """E.g. 'scan must be [batch, 160, 192, 224, 1] float32 raw intensities on the atlas grid,
        not of shape [1 256 256 256 1]: align it to the atlas and resample it onto the atlas grid
        first (docs/serving.md)'; ``shape``: the shape received, as TensorFlow prints it."""
        received = f", not of shape {shape}" if shape is not None else ""
        return (f"{self.name} must be {self.shape_text()} {self.dtype.name} {self.what}"
                f"{received}: {self.fix} ({SERVING_DOC})")

    def checked(self, tensor: tf.Tensor) -> tf.Tensor:
        """``tensor`` with its static shape, after an assertion of its rank and sizes that fails
        with ``message(<its shape>)`` (tf.errors.InvalidArgumentError)."""
        shape = tf.shape(tensor, out_type=tf.int64)
        rank = len(self.shape)
        expected = tf.constant([-1 if d is None else d for d in self.shape], tf.int64, [rank])
        # The sizes compared on a shape cut or padded to the expected rank: no shape mismatch
        # inside the check itself when the rank is wrong (-2 matches no size).
        sizes = tf.concat([shape, tf.fill([rank], tf.constant(-2, tf.int64))], 0)[:rank]
        fits = tf.logical_and(tf.equal(tf.size(shape), rank),
                              tf.reduce_all((sizes == expected) | (expected < 0)))
        text = tf.strings.format(self.message("{}"), shape, summarize=-1)
        with tf.control_dependencies([tf.debugging.Assert(fits, [text])]):
            tensor = tf.identity(tensor)  # what follows runs after the assertion
        # A static shape only, no op: grappler ran a fully static tf.ensure_shape before the
        # assertion (its own message, "Shape of tensor atlas [20,18,17] is not compatible").
        tensor.set_shape(self.shape)
        return tensor


def for_atlas_grid(grid, scan_name: str = "scan", steps_names=("steps", "coarse_steps")) -> dict:
    """The inputs of the LT-Net signatures for atlas grid ``grid`` (D, H, W): name -> ServingInput.
    """
    grid = tuple(int(s) for s in grid)
    inputs = [
        ServingInput(scan_name, (None, *grid, 1), tf.float32,
                     "raw intensities on the atlas grid",
                     "align it to the atlas and resample it onto the atlas grid first"),
        ServingInput("atlas", grid, tf.float32, "raw intensities (another atlas, same grid)",
                     "resample it onto the atlas grid first"),
        ServingInput("atlas_labels", grid, tf.int32, "label IDs of that atlas",
                     "resample them onto the atlas grid first (nearest label)"),
    ]
    inputs += [ServingInput(name, (), tf.int32, "number of refinement steps",
                            "send one number, e.g. 10") for name in steps_names]
    return {serving_input.name: serving_input for serving_input in inputs}
