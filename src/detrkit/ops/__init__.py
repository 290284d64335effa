"""Custom operators used by the detectors.

Sub-packages are imported on demand; importing :mod:`detrkit.ops` loads nothing heavy.
"""

__all__: list[str] = []
