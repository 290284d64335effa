"""Writing a detector as an ONNX file (and, optionally, as OpenVINO IR).

The graph is traced with ``torch.export`` with the batch, height and width symbolic, so
position encodings, level shapes, reference points and encoder proposals are computed in the
graph: one file serves any input size. The contract (see :mod:`detrkit.export.graph`), the
class names, the normalisation and the model's config are written into the ONNX metadata.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from detrkit.config import Config, to_dict
from detrkit.export.graph import DeployGraph, MsdaPath, RawGraph, example_inputs, msda_backend
from detrkit.export.opset import OpsetError, lower_opset
from detrkit.inference.postprocess import PostProcessor
from detrkit.structures import LabelMap

__all__ = ["ExportError", "ExportOptions", "require", "write_onnx", "METADATA_FORMAT"]

METADATA_FORMAT = "detrkit-export"
EXTRA = 'pip install "detrkit[export]"'


class ExportError(ValueError):
    """An export that cannot be done or did not pass its check; the message says why."""


@dataclass(frozen=True)
class ExportOptions:
    """How to export.

    opset: ONNX opset (13 .. 21). dynamic: symbolic batch, height and width (else the sizes
    of the example input are fixed). topk: ``K`` detections per image through the deploy
    contract, ``None`` for the raw contract. msda: how deformable attention samples in the
    graph (``None``: ``grid_sample`` from opset 16 on, ``gather`` below). with_mask: the graph
    takes a padding mask input. check: run the file and compare with PyTorch. format: ``onnx``
    or ``openvino`` (IR ``.xml`` + ``.bin`` beside the ONNX file).
    """

    opset: int = 17
    dynamic: bool = True
    topk: int | None = None
    msda: MsdaPath | None = None
    with_mask: bool = True
    check: bool = True
    format: Literal["onnx", "openvino"] = "onnx"

    def resolved_msda(self) -> MsdaPath:
        if self.msda is not None:
            return self.msda
        return "grid_sample" if self.opset >= 16 else "gather"

    def validate(self, cfg: Config) -> None:
        if not 13 <= self.opset <= 21:
            raise ExportError(f"--opset: {self.opset} is not supported (13 to 21)")
        if self.msda not in (None, "grid_sample", "gather"):
            raise ExportError(f"--msda: '{self.msda}' is not one of grid_sample, gather")
        if self.msda == "grid_sample" and self.opset < 16:
            raise ExportError(f"--msda grid_sample needs opset >= 16 (GridSample), got "
                              f"{self.opset}; use --msda gather")  # fmt: skip
        if self.format not in ("onnx", "openvino"):
            raise ExportError(f"--format: '{self.format}' is not one of onnx, openvino")
        queries = cfg.model.queries.num_queries * max(cfg.model.queries.num_patterns, 1)
        if self.topk is not None:
            pairs = queries * cfg.model.num_classes
            if self.topk < 1 or self.topk > pairs:
                raise ExportError(f"--postprocess topk={self.topk}: must be in 1..{pairs}")
            if cfg.model.class_activation == "softmax" and self.topk != queries:
                raise ExportError(f"--postprocess topk={self.topk}: a softmax model keeps one "
                                  f"detection per query; use topk={queries}")  # fmt: skip


def require(module: str) -> Any:
    """Import an optional export dependency, or say which extra installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"export needs the '{module}' package: {EXTRA}") from None


def contract_graph(model: nn.Module, cfg: Config, options: ExportOptions) -> nn.Module:
    """``model`` behind the contract ``options`` choose (raw, or deploy with ``topk``)."""
    if options.topk is None:
        return RawGraph(model, options.with_mask)
    post = PostProcessor(cfg.model.class_activation, options.topk)
    return DeployGraph(model, post, options.with_mask)


def _graph(model: nn.Module, cfg: Config, options: ExportOptions) -> tuple[nn.Module, dict]:
    """The module to trace and its inputs / outputs / dynamic shapes."""
    graph = contract_graph(model, cfg, options)
    raw = ["logits", "boxes"]
    outputs = raw if options.topk is None else ["scores", "labels", "boxes_xyxy"]
    side = max(cfg.data.augment.val_scale, 256)  # enough tokens for every query selection
    images, mask = example_inputs(2, side, side + 32)
    dim = torch.export.Dim.DYNAMIC if options.dynamic else torch.export.Dim.STATIC
    args: list[Any] = [images]
    shapes: list[Any] = [{0: dim, 2: dim, 3: dim}]
    inputs = ["images"]
    if options.with_mask:
        args.append(mask)
        shapes.append({0: dim, 1: dim, 2: dim})
        inputs.append("mask")
    if options.topk is not None:
        if not options.with_mask:
            args.append(None)
            shapes.append(None)
        args.append(torch.tensor([[side * 2, side * 3], [side, side]], dtype=torch.int64))
        shapes.append({0: dim})
        inputs.append("orig_sizes")
    return graph, {"args": tuple(args), "inputs": inputs, "outputs": outputs, "shapes": shapes}


def _metadata(cfg: Config, label_map: LabelMap, options: ExportOptions, preset: str | None
              ) -> dict[str, str]:  # fmt: skip
    from importlib.metadata import version

    raw = options.topk is None
    return {
        "format": METADATA_FORMAT,
        "format_version": "1",
        "detrkit_version": version("detrkit"),
        "contract": "raw" if raw else "deploy",
        "preset": preset or "",
        "class_names": json.dumps(label_map.names),
        "label_map": json.dumps(label_map.to_json()),
        "mean": json.dumps(cfg.data.mean),
        "std": json.dumps(cfg.data.std),
        "box_format": "cxcywh normalised to each image's unpadded size"
        if raw
        else "xyxy in pixels of orig_sizes",
        "inputs": "images float32 [B,3,H,W] normalised; mask bool [B,H,W] True = padding"
        + ("" if raw else "; orig_sizes int64 [B,2] (h, w)"),
        "outputs": "logits [B,Q,C], boxes [B,Q,4]"
        if raw
        else "scores [B,K], labels int64 [B,K], boxes_xyxy [B,K,4]",
        "topk": "" if raw else str(options.topk),
        "msda": options.resolved_msda(),
        "config": json.dumps(to_dict(cfg)),
    }


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the tracer's warnings and the graph optimiser's notes (one per multi-output node it
    does not fold: every ``Split``) off the console; they are not problems of the user's model,
    and real failures raise."""
    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def write_onnx(model: nn.Module, cfg: Config, label_map: LabelMap, path: Path,
               options: ExportOptions, preset: str | None = None) -> Path:  # fmt: skip
    """Trace ``model`` (eval mode, CPU, float32) and write ``path``; returns the path."""
    onnx = require("onnx")
    require("onnxscript")
    graph, spec = _graph(model.eval(), cfg, options)
    with msda_backend(model, options.resolved_msda()), _quiet_exporter():
        program = torch.onnx.export(
            graph, spec["args"], dynamo=True, opset_version=max(options.opset, 18),
            input_names=spec["inputs"], output_names=spec["outputs"],
            dynamic_shapes=tuple(spec["shapes"]), verbose=False,
        )  # fmt: skip
    proto = program.model_proto
    if options.opset < 18:  # the exporter writes 18 at least; step down with constants in view
        try:
            proto = lower_opset(proto, options.opset)
        except OpsetError as err:
            raise ExportError(f"--opset {options.opset}: {err}") from None
    onnx.checker.check_model(proto)
    for key, value in _metadata(cfg, label_map, options, preset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return path
