"""The Hugging Face ``transformers`` model that matches a detrkit preset, with random weights.

Only for side-by-side benchmarks: ``transformers`` is a test / benchmark dependency, never a
runtime one. Every model is built from a config (a ResNet-50 of ``transformers``' own, no
timm, nothing downloaded) and, for the deformable ones, with the PyTorch deformable-attention
path (``disable_custom_kernels=True``), which is what a CPU user of ``transformers`` runs.
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["HF_EQUIVALENTS", "build_hf_model"]

# preset -> (model kind, config fields beyond the ResNet-50 backbone and the class count)
HF_EQUIVALENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "detr_r50": ("detr", {"num_queries": 100}),
    "deformable_detr_r50": ("deformable", {"num_queries": 300}),
    "deformable_detr_r50_refine": ("deformable", {"num_queries": 300, "with_box_refine": True}),
    "deformable_detr_r50_two_stage": (
        "deformable",
        {"num_queries": 300, "with_box_refine": True, "two_stage": True},
    ),
    # DINO-4scale's nearest relative in transformers: two-stage + refine, DINO's sizes
    "dino_4scale_r50": (
        "deformable",
        {
            "num_queries": 900,
            "two_stage_num_proposals": 900,
            "with_box_refine": True,
            "two_stage": True,
            "encoder_ffn_dim": 2048,
            "decoder_ffn_dim": 2048,
        },
    ),
}


def _resnet50(out_features: list[str]) -> Any:
    import transformers

    return transformers.ResNetConfig(
        layer_type="bottleneck",
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        embedding_size=64,
        out_features=out_features,
    )


def build_hf_model(preset: str, num_classes: int) -> nn.Module:
    """The ``transformers`` model equivalent to ``preset`` (see :data:`HF_EQUIVALENTS`), random
    weights, train mode (call ``.eval()`` for inference). Needs ``transformers``."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the side-by-side benchmark needs transformers: pip install transformers"
        ) from err
    if preset not in HF_EQUIVALENTS:
        raise ValueError(
            f"no transformers equivalent of {preset!r}; known: {sorted(HF_EQUIVALENTS)}"
        )
    kind, fields = HF_EQUIVALENTS[preset]
    common = dict(
        use_pretrained_backbone=False,
        use_timm_backbone=False,
        num_labels=num_classes,
        auxiliary_loss=True,  # as the presets (and the papers' recipes): a loss per decoder layer
    )
    if kind == "detr":
        config = transformers.DetrConfig(backbone_config=_resnet50(["stage4"]), **common, **fields)
        return transformers.DetrForObjectDetection(config)
    config = transformers.DeformableDetrConfig(
        backbone_config=_resnet50(["stage2", "stage3", "stage4"]),
        disable_custom_kernels=True,
        **common,
        **fields,
    )
    return transformers.DeformableDetrForObjectDetection(config)
