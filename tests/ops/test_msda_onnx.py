"""ONNX export of MSDeformAttn (reference backend), checked with onnxruntime on CPU."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import Tensor, nn

from detrkit.ops.msda import MSDeformAttn, SpatialShapes

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime")

SHAPES = ((6, 7), (3, 4), (2, 2))
SEQ = sum(h * w for h, w in SHAPES)
D_MODEL = 32
INPUT_NAMES = ["query", "reference_points", "input_flatten", "padding_mask"]


class _Wrapper(nn.Module):
    """MSDeformAttn with the spatial shapes bound: they are constants of the exported graph."""

    def __init__(self, module: MSDeformAttn, shapes: SpatialShapes) -> None:
        super().__init__()
        self.module = module
        self.shapes = shapes

    def forward(
        self, query: Tensor, reference_points: Tensor, input_flatten: Tensor, padding_mask: Tensor
    ) -> Tensor:
        return self.module(query, reference_points, input_flatten, self.shapes, None, padding_mask)


def _module() -> MSDeformAttn:
    torch.manual_seed(0)
    module = MSDeformAttn(D_MODEL, n_levels=3, nheads=4, n_points=2, backend="reference").eval()
    with torch.no_grad():
        module.sampling_offsets.weight.normal_(0.0, 0.2)
        module.attention_weights.weight.normal_(0.0, 0.2)
    return module


def _inputs(batch: int, seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, SEQ, dtype=torch.bool)
    mask[0, -5:] = True
    return (
        torch.randn(batch, 5, D_MODEL, generator=gen),
        torch.rand(batch, 5, len(SHAPES), 2, generator=gen) * 1.2 - 0.1,
        torch.randn(batch, SEQ, D_MODEL, generator=gen),
        mask,
    )


def _check_with_onnxruntime(model: nn.Module, session: ort.InferenceSession) -> None:
    assert [i.name for i in session.get_inputs()] == INPUT_NAMES
    for batch in (2, 3):  # dynamic batch: export used 2
        inputs = _inputs(batch, seed=batch)
        got = session.run(None, {name: t.numpy() for name, t in zip(INPUT_NAMES, inputs)})[0]
        with torch.no_grad():
            expected = model(*inputs)
        torch.testing.assert_close(torch.from_numpy(got), expected, atol=1e-5, rtol=1e-5)


def test_torchscript_export_opset17_tensor_shapes():
    model = _Wrapper(_module(), torch.tensor(SHAPES))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the shapes become constants, as intended
        torch.onnx.export(
            model,
            _inputs(2, seed=0),
            buffer,
            opset_version=17,
            dynamo=False,
            input_names=INPUT_NAMES,
            output_names=["output"],
            dynamic_axes={name: {0: "batch"} for name in INPUT_NAMES + ["output"]},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    assert {op.domain: op.version for op in proto.opset_import}.get("") == 17
    assert any(node.op_type == "GridSample" for node in proto.graph.node)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    _check_with_onnxruntime(model, session)


def test_dynamo_export_int_shapes(tmp_path):
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    model = _Wrapper(_module(), SHAPES)
    batch = torch.export.Dim("batch")
    path = tmp_path / "msda.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            _inputs(2, seed=0),
            str(path),
            dynamo=True,
            opset_version=17,
            input_names=INPUT_NAMES,
            output_names=["output"],
            dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch}),
            verbose=False,
        )
    _check_with_onnxruntime(
        model, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    )
