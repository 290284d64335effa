"""Running an exported file: onnxruntime (CPU) or OpenVINO, behind the model's interface.

:class:`ExportedModel` takes ``images`` / ``mask`` tensors like the PyTorch detector and
returns a :class:`~detrkit.structures.DetectorOutput` (raw contract), so
:class:`detrkit.Detector` predicts with it unchanged; :func:`read_export` recovers the config
and label map from the file's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from detrkit.config import Config, from_dict
from detrkit.export.onnx import METADATA_FORMAT, ExportError, require
from detrkit.structures import DetectorOutput, LabelMap

__all__ = ["Runtime", "ExportedModel", "read_export"]

Runtime = Literal["onnxruntime", "openvino"]


def read_export(path: str | Path) -> tuple[dict[str, str], Config, LabelMap]:
    """The metadata, config and label map written into an exported ONNX file."""
    onnx = require("onnx")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: exported model not found")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # onnx raises DecodeError and others
        raise ExportError(f"{path}: not a readable ONNX file ({err})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if meta.get("format") != METADATA_FORMAT:
        raise ExportError(f"{path}: not exported by detrkit (no '{METADATA_FORMAT}' metadata)")
    cfg = from_dict(json.loads(meta["config"])).validate()
    return meta, cfg, LabelMap.from_json(json.loads(meta["label_map"]))


class ExportedModel:
    """An exported file run by ``runtime``; call it like the PyTorch model.

    Args:
        path: the ``.onnx`` file (for OpenVINO, the ``.xml`` IR beside it is used when present).
        runtime: ``onnxruntime`` (CPU provider) or ``openvino`` (CPU).
    """

    def __init__(self, path: str | Path, runtime: Runtime = "onnxruntime") -> None:
        self.path = Path(path)
        self.metadata, self.config, self.label_map = read_export(self.path)
        self.runtime = runtime
        if runtime == "onnxruntime":
            ort = require("onnxruntime")
            options = ort.SessionOptions()
            options.log_severity_level = 3  # errors only, not the optimiser's notes
            self._session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
            self.input_names = [i.name for i in self._session.get_inputs()]
        elif runtime == "openvino":
            ov = require("openvino")
            xml = self.path.with_suffix(".xml")
            # float32 as exported: on CPUs with bf16 units OpenVINO would otherwise infer in bf16
            compiled = ov.Core().compile_model(
                str(xml if xml.is_file() else self.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
            )
            self._session = compiled
            self.input_names = [i.get_any_name() for i in compiled.inputs]
        else:
            raise ExportError(f"runtime: '{runtime}' is not one of onnxruntime, openvino")

    @property
    def contract(self) -> str:
        return self.metadata["contract"]

    def run(self, feeds: dict[str, Tensor]) -> list[np.ndarray]:
        """Run the graph on the inputs it takes (others in ``feeds`` are left out)."""
        arrays = {k: v.detach().cpu().numpy() for k, v in feeds.items() if k in self.input_names}
        if self.runtime == "onnxruntime":
            return self._session.run(None, arrays)
        result = self._session(arrays)
        return [result[out] for out in self._session.outputs]

    # the parts of the nn.Module interface that Detector uses
    def to(self, device: Any) -> ExportedModel:
        if torch.device(device).type != "cpu":
            raise ExportError(f"an exported model runs on the CPU, not on {device}")
        return self

    def eval(self) -> ExportedModel:
        return self

    def __call__(self, images: Tensor, mask: Tensor) -> DetectorOutput:
        """``images`` ``[B, 3, H, W]``, ``mask`` ``[B, H, W]`` -> logits / boxes (raw contract)."""
        if self.contract != "raw":
            raise ExportError(f"{self.path}: a '{self.contract}' export returns detections, not "
                              "logits; export with the raw contract to predict through it")  # fmt: skip
        logits, boxes = self.run({"images": images.float(), "mask": mask})[:2]
        return DetectorOutput(logits=torch.from_numpy(logits), boxes=torch.from_numpy(boxes))
