"""How ``checkpoints_v1/`` was made (run once with detrkit at checkpoint format 1).

For each preset: build the model with seed 0, set the backbone to
:func:`tests.engine.legacy_weights.backbone_value`, round every other tensor to float16,
save it with ``save_checkpoint`` (format 1), and record the eval-mode outputs on a fixed
padded batch. The committed ``<preset>.safetensors`` keeps the non-backbone tensors in float16
(exact), ``<preset>.json`` is the checkpoint JSON as written, ``<preset>.outputs.safetensors``
holds the outputs on :func:`inputs`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from detrkit.checkpoint import save_checkpoint  # noqa: E402
from detrkit.models import build_model  # noqa: E402
from detrkit.presets import get_preset  # noqa: E402
from tests.engine.legacy_weights import backbone_value  # noqa: E402

PRESETS = ["test_detr_tiny", "test_dn_detr_tiny", "test_deformable_detr_tiny",
           "test_deformable_detr_tiny_two_stage", "test_dn_deformable_detr_tiny",
           "test_dino_tiny"]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    images = torch.randn(2, 3, 96, 128, generator=gen).half().float()
    mask = torch.zeros(2, 96, 128, dtype=torch.bool)
    mask[1, 80:, :] = True
    mask[1, :, 100:] = True
    images[1][:, mask[1]] = 0.0
    return images, mask


def main() -> None:
    images, mask = inputs()
    for name in PRESETS:
        torch.manual_seed(0)
        cfg = get_preset(name)
        model = build_model(cfg).eval()
        state = model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                if key.startswith("backbone."):
                    value.copy_(backbone_value(key, tuple(value.shape)))
                elif value.is_floating_point():
                    value.copy_(value.half().float())
        save_checkpoint(HERE / name, model, cfg, extra={"made_by": "checkpoints_v1/make.py"})
        weights = load_file(str(HERE / f"{name}.safetensors"))
        small = {k: v.half() for k, v in weights.items() if not k.startswith("backbone.")}
        meta = json.loads((HERE / f"{name}.json").read_text())
        meta["elided_backbone"] = {k: list(v.shape) for k, v in weights.items()
                                   if k.startswith("backbone.")}
        (HERE / f"{name}.json").write_text(json.dumps(meta, indent=1))
        save_file(small, str(HERE / f"{name}.safetensors"))
        with torch.no_grad():
            out = model(images, mask)
        tensors = {"logits": out.logits, "boxes": out.boxes}
        for i, aux in enumerate(out.aux):
            tensors[f"aux.{i}.logits"], tensors[f"aux.{i}.boxes"] = aux.logits, aux.boxes
        if out.enc is not None:
            tensors["enc.logits"], tensors["enc.boxes"] = out.enc.logits, out.enc.boxes
        save_file({k: v.contiguous() for k, v in tensors.items()},
                  str(HERE / f"{name}.outputs.safetensors"))
        print(name, sum(v.numel() for v in small.values()))


if __name__ == "__main__":
    main()
