"""Export to ONNX / OpenVINO, checked against PyTorch before it counts as done, and running
exported files (see docs/export.md for the contracts)."""

from detrkit.export.api import ExportCheckError, ExportResult, export_model
from detrkit.export.check import CheckResult, check_export
from detrkit.export.graph import DeployGraph, MsdaPath, RawGraph
from detrkit.export.onnx import ExportError, ExportOptions, write_onnx
from detrkit.export.runtime import ExportedModel, read_export

__all__ = [
    "ExportError",
    "ExportCheckError",
    "ExportOptions",
    "ExportResult",
    "ExportedModel",
    "CheckResult",
    "MsdaPath",
    "RawGraph",
    "DeployGraph",
    "check_export",
    "export_model",
    "read_export",
    "write_onnx",
]
