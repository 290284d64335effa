"""``export_model``: write an export, convert it for OpenVINO if asked, and check it."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from detrkit.config import Config
from detrkit.export.check import CheckResult, check_export
from detrkit.export.onnx import ExportError, ExportOptions, contract_graph, require, write_onnx
from detrkit.export.runtime import ExportedModel
from detrkit.structures import LabelMap

__all__ = ["ExportCheckError", "ExportResult", "export_model"]


class ExportCheckError(ExportError):
    """The written file does not reproduce the PyTorch model (it is kept for inspection)."""


@dataclass
class ExportResult:
    """files: what was written (ONNX, and OpenVINO IR). checks: one result per runtime."""

    path: Path
    files: list[Path]
    checks: list[CheckResult] = field(default_factory=list)


def _writable(path: Path) -> Path:
    if path.suffix != ".onnx":
        raise ExportError(f"--out {path}: the exported file must end in .onnx")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ExportError(f"--out {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(f"--out {path}: cannot write there (permission denied)")
    return path


def export_model(model: nn.Module, cfg: Config, label_map: LabelMap, path: str | Path,
                 options: ExportOptions | None = None, preset: str | None = None,
                 echo: Callable[[str], None] | None = None) -> ExportResult:  # fmt: skip
    """Export ``model`` (a :class:`~detrkit.models.DetectionModel` on the CPU) to ``path``.

    The ONNX file (and with ``format="openvino"`` the IR ``.xml`` / ``.bin`` beside it) is
    written, then, with ``options.check``, run by each runtime on two other input sizes and
    compared with PyTorch (:mod:`detrkit.export.check`). Raises :class:`ExportCheckError`
    (the files stay) when a comparison fails; ``echo`` receives the report lines.
    """
    options = options or ExportOptions()
    options.validate(cfg)
    path = _writable(Path(path))
    model = model.cpu().float().eval()
    write_onnx(model, cfg, label_map, path, options, preset)
    files, runtimes = [path], ["onnxruntime"]
    if options.format == "openvino":
        ov = require("openvino")
        xml = path.with_suffix(".xml")
        # save_model halves the weights to float16 unless told not to: 1e-3 off in the outputs
        ov.save_model(ov.convert_model(str(path)), str(xml), compress_to_fp16=False)
        files += [xml, xml.with_suffix(".bin")]
        runtimes.append("openvino")
    result = ExportResult(path, files)
    if options.check:
        graph = contract_graph(model, cfg, options).eval()
        for runtime in runtimes:
            check = check_export(graph, cfg, ExportedModel(path, runtime))  # type: ignore[arg-type]
            result.checks.append(check)
            if echo is not None:
                echo(check.report())
            if not check.passed:
                raise ExportCheckError(
                    f"{path}: the export does not reproduce the PyTorch model (kept for "
                    f"inspection)\n{check.report()}"
                )
    return result
