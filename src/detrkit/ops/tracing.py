"""Whether a compiler or exporter is tracing the code now.

Eager-only fast paths (a sparse CSR product, a loop over chunks of tokens) step aside while
``torch.compile``, ``torch.export`` (and so ONNX export) or TorchScript trace the model, so the
traced graph holds the plain reference operations and no shape is fixed by a Python branch.
"""

from __future__ import annotations

import torch

__all__ = ["is_tracing"]


def is_tracing() -> bool:
    """True under ``torch.compile``, ``torch.export`` and ``torch.jit`` tracing or scripting."""
    return bool(
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )
