"""detrkit: the DETR family of object detectors (DETR, Deformable DETR, DAB-DETR, DN-DETR,
DINO) in one PyTorch code base.

Quick start::

    import detrkit
    det = detrkit.Detector.from_checkpoint("runs/demo/checkpoint_best")
    predictions = det.predict("image.jpg", threshold=0.5)

Importing this package is cheap and has no side effects: the names below are resolved on
first use, and nothing touches CUDA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Detector", "__version__", "get_preset", "list_presets"]

if TYPE_CHECKING:  # pragma: no cover
    from detrkit.api import Detector
    from detrkit.presets import get_preset, list_presets


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("detrkit")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0.0.0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        value: Any = _version()
    elif name == "Detector":
        from detrkit.api import Detector as value
    elif name in ("get_preset", "list_presets"):
        from detrkit import presets

        value = getattr(presets, name)
    else:
        raise AttributeError(f"module 'detrkit' has no attribute '{name}'")
    globals()[name] = value  # cache: later look-ups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
