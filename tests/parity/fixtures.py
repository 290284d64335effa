"""Discovery and loading of the official reference fixtures (see their README).

The folder comes from ``DETRKIT_PARITY_FIXTURES`` (default: ``../shared/reference/official``
beside the repository). Every sub-folder holding a ``fixture.json`` is one fixture.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DIR = REPO.parent / "shared" / "reference" / "official"


def fixtures_dir() -> Path:
    return Path(os.environ.get("DETRKIT_PARITY_FIXTURES", DEFAULT_DIR))


def fixture_names() -> list[str]:
    root = fixtures_dir()
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/fixture.json"))


@dataclass
class Fixture:
    name: str
    path: Path
    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def family(self) -> str:
        return self.meta["family"]

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The merged official state dict, floating tensors cast to ``dtype``."""
        state: dict[str, torch.Tensor] = {}
        for wf in self.meta["weight_files"]:
            for k, v in load_file(str((self.path / wf["file"]).resolve())).items():
                state[k] = v.to(dtype) if v.is_floating_point() else v
        assert set(state) == set(self.meta["state_dict"]["shapes"]), self.name
        return state

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with ``prefix.``, with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}

    def targets(self) -> list[dict[str, torch.Tensor]]:
        out = []
        b = 0
        while f"targets.{b}.labels" in self.tensors:
            out.append({"labels": self.tensors[f"targets.{b}.labels"],
                        "boxes": self.tensors[f"targets.{b}.boxes"]})
            b += 1
        return out


@lru_cache(maxsize=None)
def load_fixture(name: str) -> Fixture:
    path = fixtures_dir() / name
    meta = json.loads((path / "fixture.json").read_text())
    tensors = load_file(str(path / "tensors.safetensors"))
    return Fixture(name, path, meta, tensors)
