"""Writing an exported graph at an opset below 18.

``torch.onnx.export`` writes opset 18 and leaves the file there, with a warning, when the ONNX
version converter cannot step down: it has no adapter for ``Split`` with ``num_outputs`` and
refuses the 18 -> 17 step of reductions whose ``axes`` it does not see as constants (and has
no adapters at all for several operators below 16). Between opsets 13 and 18 the operators
these graphs use changed their signatures only as below, so :func:`lower_opset` rewrites
those nodes, declares the lower opset and validates every node against that opset's schemas
with ``onnx.checker``: any operator the opset lacks (``GridSample`` below 16) is an error
naming it, never a file silently left at opset 18. The export check then runs the result.

* ``Split`` with ``num_outputs``: opsets < 18 split equally into as many outputs without it.
* ``ReduceMin`` / ``ReduceMax`` / ``ReduceMean`` / ... with an ``axes`` input: an attribute
  before 18 (``ReduceSum`` takes the input since 13 and stays).
* attributes added after the target opset that hold their default value are dropped.
* ``LayerNormalization`` (opset 17) below 17: mean, variance and affine with plain ops.
* ``Shape`` with ``start`` / ``end`` (opset 15) below 15: the whole shape, then a ``Slice``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["OpsetError", "lower_opset", "model_opset"]

_AXES_TO_ATTRIBUTE = {
    "ReduceMin", "ReduceMax", "ReduceMean", "ReduceProd", "ReduceL1", "ReduceL2",
    "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
}  # fmt: skip


class OpsetError(ValueError):
    """The graph cannot be written at the asked opset; the message names the operator."""


def model_opset(proto: Any) -> int:
    """The default-domain opset the model declares."""
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _constants(proto: Any) -> dict[str, Any]:
    """name -> numpy array of every initializer and ``Constant`` node output."""
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _split_without_num_outputs(node: Any, constants: dict[str, Any]) -> None:
    keep = [a for a in node.attribute if a.name != "num_outputs"]
    if len(keep) == len(node.attribute) or len(node.input) > 1:
        return
    source = constants.get(node.input[0])
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if source is not None and source.shape[axis] % len(node.output):
        raise OpsetError(f"Split {node.name}: {source.shape[axis]} does not split into "
                         f"{len(node.output)} equal parts below opset 18")  # fmt: skip
    del node.attribute[:]
    node.attribute.extend(keep)


def _axes_to_attribute(node: Any, constants: dict[str, Any]) -> None:
    from onnx import helper

    if len(node.input) < 2 or not node.input[1]:
        return
    if node.input[1] not in constants:
        raise OpsetError(f"{node.op_type} {node.name}: its axes are computed in the graph; "
                         "opsets below 18 need them constant, export with --opset 18")  # fmt: skip
    axes = [int(v) for v in constants[node.input[1]].reshape(-1)]
    del node.input[1:]
    node.attribute.append(helper.make_attribute("axes", axes))


def _drop_default_attributes(node: Any, target: int) -> None:
    """Attributes the operator gained after ``target`` go when they hold their default
    (``noop_with_empty_axes=0`` of reductions) or cannot matter (``allowzero`` of ``Reshape``)."""
    from onnx import defs, helper

    try:
        old = defs.get_schema(node.op_type, target).attributes
        new = defs.get_schema(node.op_type, 18).attributes
    except defs.SchemaError:
        return  # an operator the target lacks: the checker names it
    keep = []
    for attr in node.attribute:
        if node.op_type == "Reshape" and attr.name == "allowzero":
            continue  # torch writes 1; it differs from 0 only for a 0 in the shape (an empty
            # tensor), which no dimension of these graphs (batch, sides, levels, queries) is
        if attr.name not in old and attr.name in new:
            default = new[attr.name].default_value
            if helper.get_attribute_value(attr) != helper.get_attribute_value(default):
                raise OpsetError(f"{node.op_type} {node.name}: attribute {attr.name} is new "
                                 f"after opset {target}; export with a higher --opset")  # fmt: skip
            continue
        keep.append(attr)
    del node.attribute[:]
    node.attribute.extend(keep)


def _shape_then_slice(node: Any) -> list[Any]:
    """``Shape`` with ``start`` / ``end`` (opset 15) as ``Shape`` and a ``Slice``."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if not attrs:
        return [node]
    n = f"{node.name or node.output[0]}_sl"
    bounds = [attrs.get("start", 0), attrs.get("end", 2**62), 0]
    consts = [
        helper.make_node(
            "Constant",
            [],
            [f"{n}_{i}"],
            name=f"{n}_{i}",
            value=helper.make_tensor(f"{n}_{i}", 7, [1], [v]),
        )
        for i, v in enumerate(bounds)
    ]
    whole = helper.make_node("Shape", list(node.input), [f"{n}_all"], name=f"{n}_all")
    cut = helper.make_node("Slice", [f"{n}_all", *(c.output[0] for c in consts)],
                           list(node.output), name=n)  # fmt: skip
    return [*consts, whole, cut]


def _decompose_layer_norm(node: Any) -> list[Any]:
    """The nodes of ``LayerNormalization`` over the last axis, written with opset-13 ops."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("axis", -1) != -1 or (len(node.output) > 1 and any(node.output[1:])):
        raise OpsetError(f"LayerNormalization {node.name}: only the last axis and the main "
                         "output can be written below opset 17; export with --opset 17")  # fmt: skip
    eps = float(attrs.get("epsilon", 1e-5))
    x, scale = node.input[0], node.input[1]
    n = f"{node.name or node.output[0]}_ln"

    def make(op: str, inputs: list[str], **kw: Any) -> Any:
        return helper.make_node(op, inputs, [f"{n}_{len(out)}"], name=f"{n}_{len(out)}", **kw)

    out: list[Any] = []
    out.append(make("ReduceMean", [x], axes=[-1], keepdims=1))
    out.append(make("Sub", [x, out[-1].output[0]]))
    centred = out[-1].output[0]
    out.append(make("Mul", [centred, centred]))
    out.append(make("ReduceMean", [out[-1].output[0]], axes=[-1], keepdims=1))
    eps_name = f"{n}_eps"
    out.append(helper.make_node("Constant", [], [eps_name], name=eps_name,
                                value=helper.make_tensor(eps_name, 1, [], [eps])))  # fmt: skip
    out.append(make("Add", [out[-2].output[0], eps_name]))
    out.append(make("Sqrt", [out[-1].output[0]]))
    out.append(make("Div", [centred, out[-1].output[0]]))
    out.append(make("Mul", [out[-1].output[0], scale]))
    if len(node.input) > 2 and node.input[2]:
        out.append(make("Add", [out[-1].output[0], node.input[2]]))
    out[-1].output[0] = node.output[0]
    return out


def lower_opset(proto: Any, target: int) -> Any:
    """``proto`` (opset 18) rewritten for opset ``target`` (13 .. 17); returns the new proto.

    Raises :class:`OpsetError` naming the operator that cannot be expressed.
    """
    from onnx import checker

    if model_opset(proto) != 18:
        raise OpsetError(f"expected an opset-18 graph to lower, got {model_opset(proto)}")
    constants = _constants(proto)
    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Split":
            _split_without_num_outputs(node, constants)
        elif node.op_type in _AXES_TO_ATTRIBUTE:
            _axes_to_attribute(node, constants)
        if node.op_type != "Shape":
            _drop_default_attributes(node, target)
        if node.op_type == "LayerNormalization" and target < 17:
            nodes.extend(_decompose_layer_norm(node))
        elif node.op_type == "Shape" and target < 15:
            nodes.extend(_shape_then_slice(node))
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = target
    try:  # every node against the schema of its operator at ``target``
        checker.check_model(proto)
    except checker.ValidationError as err:
        raise OpsetError(f"opset {target} cannot express the graph: "
                         f"{str(err).strip().splitlines()[0]}") from None  # fmt: skip
    return proto
