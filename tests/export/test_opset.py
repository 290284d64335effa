"""Stepping an opset-18 graph down (detrkit.export.opset): each rewritten operator gives the
same result at the lower opset as the original graph at 18, run by onnxruntime; what the lower
opset cannot express is an error naming the operator."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from detrkit.export.opset import OpsetError, lower_opset, model_opset  # noqa: E402


def _model(nodes, inits, out_shape):
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


def _run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _cases():
    ln_scale, ln_bias = np.linspace(0.5, 2, 4, dtype=np.float32), np.arange(4, dtype=np.float32)
    return {
        "reduce_axes_input": (
            [
                helper.make_node("ReduceMax", ["x", "axes"], ["m"], keepdims=1),
                helper.make_node(
                    "ReduceMin", ["x", "axes"], ["n"], keepdims=1, noop_with_empty_axes=0
                ),
                helper.make_node("Sub", ["m", "n"], ["y"]),
            ],
            {"axes": np.array([1], dtype=np.int64)},
            [2, 1, 4],
        ),
        "split_num_outputs": (
            [
                helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3),
                helper.make_node("Sub", ["a", "c"], ["d"]),
                helper.make_node("Mul", ["d", "b"], ["y"]),
            ],
            {},
            [2, 2, 4],
        ),
        "layer_norm": (
            [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=-1, epsilon=1e-3)],
            {"s": ln_scale, "b": ln_bias},
            [2, 6, 4],
        ),
        "shape_start_end_and_reshape_allowzero": (
            [
                helper.make_node("Shape", ["x"], ["hw"], start=1),
                helper.make_node("Concat", ["one", "hw"], ["shape"], axis=0),
                helper.make_node("Reshape", ["x", "shape"], ["r"], allowzero=1),
                helper.make_node("ReduceSum", ["r", "zero"], ["y"], keepdims=0),
            ],
            {"one": np.array([-1], dtype=np.int64), "zero": np.array([0], dtype=np.int64)},
            [6, 4],
        ),
    }


@pytest.mark.parametrize("target", [13, 16, 17])
@pytest.mark.parametrize("case", list(_cases()))
def test_lowered_graph_computes_the_same(case, target):
    nodes, inits, out_shape = _cases()[case]
    x = np.random.default_rng(0).standard_normal((2, 6, 4)).astype(np.float32)
    expected = _run(_model(nodes, inits, out_shape), x)
    lowered = lower_opset(_model(nodes, inits, out_shape), target)
    assert model_opset(lowered) == target
    onnx.checker.check_model(lowered)
    if case == "layer_norm" and target < 17:
        assert "LayerNormalization" not in {n.op_type for n in lowered.graph.node}
    np.testing.assert_allclose(_run(lowered, x), expected, atol=1e-5, rtol=1e-5)


def test_an_operator_the_opset_lacks_is_named():
    nodes = [
        helper.make_node("Unsqueeze", ["x", "zero"], ["x4"]),
        helper.make_node("GridSample", ["x4", "grid"], ["g"]),
        helper.make_node("Squeeze", ["g", "zero"], ["y"]),
    ]
    grid = np.zeros((1, 6, 4, 2), dtype=np.float32)
    model = _model(nodes, {"zero": np.array([0], dtype=np.int64), "grid": grid}, [2, 6, 4])
    with pytest.raises(OpsetError, match="GridSample"):
        lower_opset(model, 15)


def test_axes_computed_in_the_graph_are_refused():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], start=2),
        helper.make_node("Sub", ["s", "two"], ["axes"]),
        helper.make_node("ReduceMax", ["x", "axes"], ["y"], keepdims=1),
    ]
    model = _model(nodes, {"two": np.array([2], dtype=np.int64)}, [2, 6, 4])
    with pytest.raises(OpsetError, match="ReduceMax .*axes are computed"):
        lower_opset(model, 17)
