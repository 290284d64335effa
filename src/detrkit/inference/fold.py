"""Inference-time folding: frozen batch norm merged into the convolution before it.

``conv(x) * scale + shift`` with a per-channel ``scale = weight / sqrt(running_var + eps)`` and
``shift = bias - running_mean * scale`` is one convolution with weights ``W * scale`` and bias
``shift`` (plus ``b * scale`` when the convolution has a bias). Folding removes one full pass
over every feature map per batch norm (53 in a ResNet-50).

:func:`inference_model` returns a second :class:`DetectionModel` for prediction that shares the
neck, position encoding and transformer with the trained model and has a folded copy of the
backbone; the trained model, its state dict and checkpoints stay as they are. Outputs agree with
the unfolded model up to float rounding (tested).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from detrkit.models.backbone import FrozenBatchNorm2d
from detrkit.models.detector import DetectionModel

__all__ = ["fold_frozen_batchnorm", "inference_model", "ChannelsLastBackbone", "InferenceView"]


def _fold_into(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Merge ``norm`` into ``conv`` in place (``conv`` gains a bias)."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # [C_out]
    shift = norm.bias - norm.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias.detach() * scale
    conv.weight = nn.Parameter(conv.weight.detach() * scale.reshape(-1, 1, 1, 1), False)
    conv.bias = nn.Parameter(shift.detach().clone(), False)


def _partner(parent: nn.Module, names: list[str], index: int) -> nn.Conv2d | None:
    """The convolution whose output the batch norm ``names[index]`` of ``parent`` normalises:
    ``convK`` for ``bnK`` (torchvision's blocks and stem), the previous entry in a Sequential
    (the ``downsample`` branch)."""
    name = names[index]
    if name.startswith("bn"):
        conv = parent._modules.get("conv" + name[2:])
    elif isinstance(parent, nn.Sequential) and index > 0:
        conv = parent._modules[names[index - 1]]
    else:
        conv = None
    return conv if isinstance(conv, nn.Conv2d) else None


def fold_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in which every :class:`FrozenBatchNorm2d` that follows a
    convolution (torchvision ResNet layout) is merged into it and replaced by ``nn.Identity``.

    A batch norm without such a partner is kept as it is; the input module is not changed.
    The copy is for inference: its folded weights do not require gradients.
    """
    folded = copy.deepcopy(module)
    for parent in list(folded.modules()):
        names = list(parent._modules)
        for index, name in enumerate(names):
            child = parent._modules[name]
            if not isinstance(child, FrozenBatchNorm2d):
                continue
            conv = _partner(parent, names, index)
            if conv is not None:
                _fold_into(conv, child)
                parent._modules[name] = nn.Identity()
    return folded


class ChannelsLastBackbone(nn.Module):
    """Runs ``backbone`` on a ``channels_last`` copy of the images (its weights converted once);
    on the CPU, oneDNN's convolutions are faster in that layout. The returned maps keep it,
    which the transformer's ``flatten(2).transpose(1, 2)`` turns into contiguous tokens for
    free. Same interface as :class:`ResNetBackbone`."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.inner = backbone.to(memory_format=torch.channels_last)
        self.num_channels = getattr(backbone, "num_channels", None)
        self.strides = getattr(backbone, "strides", None)

    def forward(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """``images`` ``[B, 3, H, W]``, ``mask`` ``[B, H, W]`` bool (True = padding)."""
        return self.inner(images.contiguous(memory_format=torch.channels_last), mask)


def inference_model(model: DetectionModel, *, channels_last: bool = False) -> DetectionModel:
    """A :class:`DetectionModel` for prediction: a folded copy of ``model.backbone`` (see
    :func:`fold_frozen_batchnorm`), optionally in ``channels_last``, with the neck, position
    encoding and transformer of ``model`` shared, not copied (they keep their train/eval
    mode; the folded backbone is in eval mode).

    A change to ``model``'s backbone weights afterwards is not seen by the returned model
    (build it again).
    """
    if not isinstance(model, DetectionModel):
        raise TypeError(f"inference_model: expected a DetectionModel, got {type(model).__name__}")
    backbone = fold_frozen_batchnorm(model.backbone).eval()
    if channels_last:
        backbone = ChannelsLastBackbone(backbone)
    return DetectionModel(
        backbone,
        model.neck,
        model.position,
        model.transformer,
        num_classes=model.num_classes,
        class_activation=model.class_activation,
        aux_loss=model.aux_loss,
    )


class InferenceView:
    """Holds the :func:`inference_model` of one model and builds it again when the model, the
    layout, or any backbone weight changes (new storage after ``.to(device)``, or an in-place
    write such as ``load_state_dict`` or an optimiser step, seen in the tensor's version)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._model: DetectionModel | None = None

    def of(self, model: DetectionModel, *, channels_last: bool) -> DetectionModel:
        tensors = [*model.backbone.parameters(), *model.backbone.buffers()]
        key = (id(model), channels_last, *((t.data_ptr(), t._version) for t in tensors))
        if self._model is None or key != self._key:
            self._model = inference_model(model, channels_last=channels_last)
            self._key = key
        return self._model
