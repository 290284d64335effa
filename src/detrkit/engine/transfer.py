"""Starting a model from weights trained elsewhere, with the same or another class count.

:class:`PretrainedWeights` is a state dict in detrkit's key layout with the model config it
belongs to (read from a detrkit checkpoint, an official checkpoint or a Hugging Face
directory by :mod:`detrkit.pretrained`). :func:`check_architecture` refuses a run whose model
differs from the weights' in anything that shapes parameters (one line naming the field);
:func:`transfer_weights` copies every tensor into a freshly built model and leaves the
class-dependent ones (class heads of every decoder layer and of the encoder proposals, with
their prior-probability bias, and the denoising label embedding) at their new initialisation
when the classes differ.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from detrkit.config import Config, ConfigError, ModelConfig
from detrkit.models import DetectionModel
from detrkit.structures import LabelMap

__all__ = [
    "PretrainedWeights",
    "TransferReport",
    "architecture_mismatch",
    "check_architecture",
    "adopt_model_config",
    "transfer_weights",
]

# model fields that may differ between the weights and the run: they shape no parameter, or
# only the class-dependent ones (re-initialised when the classes differ) or the per-query
# embeddings (re-initialised when the query count differs)
FREE_FIELDS = frozenset(
    {
        "num_classes",
        "aux_loss",
        "backbone.pretrained",
        "backbone.frozen_stages",
        "transformer.dropout",
        "transformer.msda_backend",
        "queries.select_valid_proposals",
        "queries.num_queries",
        "denoising.kind",
        "denoising.dn_number",
        "denoising.label_noise_ratio",
        "denoising.box_noise_scale",
        "denoising.labelbook_size",
    }
)


@dataclass
class PretrainedWeights:
    """Weights to start from. state: detrkit key layout; config: the config they were built
    (or, for converted weights, are described) with; label_map: their classes; source: what
    was read (for messages)."""

    state: dict[str, Tensor]
    config: Config
    label_map: LabelMap
    source: str
    kind: Literal["detrkit", "official", "huggingface"]

    @property
    def model(self) -> ModelConfig:
        return self.config.model


@dataclass
class TransferReport:
    """Which tensors of the new model were loaded and which kept their new initialisation,
    and which tensors of the weights found no place."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)

    def table(self) -> str:
        """A short table: one row per kind with the number of tensors and, for the
        re-initialised and unused ones, their modules."""
        rows = [
            ("loaded", len(self.loaded), ""),
            ("re-initialised", len(self.reinitialised), _modules(self.reinitialised)),
            ("unused", len(self.unused), _modules(self.unused)),
        ]
        lines = [f"weights from {self.source}:"]
        lines += [f"  {kind:<15}{count:>5}  {where}".rstrip() for kind, count, where in rows]
        return "\n".join(lines)


def _modules(keys: list[str]) -> str:
    """``a.b.weight, a.b.bias, c.weight`` -> ``a.b, c`` (first appearance order)."""
    seen: dict[str, None] = {}
    for key in keys:
        seen.setdefault(key.rsplit(".", 1)[0], None)
    return ", ".join(seen)


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{path}.")
        else:
            yield path, value


def architecture_mismatch(source: ModelConfig, target: ModelConfig) -> list[tuple[str, Any, Any]]:
    """``(field, source value, target value)`` for every model field outside
    :data:`FREE_FIELDS` that differs (field paths relative to ``model``)."""
    theirs = dict(_leaves(source))
    return [
        (path, theirs[path], ours)
        for path, ours in _leaves(target)
        if path not in FREE_FIELDS and theirs[path] != ours
    ]


def check_architecture(weights: PretrainedWeights, target: ModelConfig) -> None:
    """Raise :class:`ConfigError` (one line, naming the first differing field) when the run's
    model cannot hold ``weights``."""
    diffs = architecture_mismatch(weights.model, target)
    if not diffs:
        return
    path, theirs, ours = diffs[0]
    more = f" (and {len(diffs) - 1} more: {', '.join(d[0] for d in diffs[1:4])})"
    raise ConfigError(
        f"model.{path}: the weights of {weights.source} were built with {theirs!r}, this run "
        f"with {ours!r}{more if len(diffs) > 1 else ''}; use the weights' model config "
        "(train with --init-from alone, without --preset/--config) or other weights"
    )


def adopt_model_config(weights: PretrainedWeights, num_classes: int | None) -> ModelConfig:
    """The weights' model config with ``num_classes`` (None keeps theirs). With another class
    count, a denoising label book sized for the old classes follows the new count."""
    model = dataclasses.replace(weights.model)
    if num_classes is None or num_classes == model.num_classes:
        return model
    denoising = dataclasses.replace(model.denoising, labelbook_size=None)
    return dataclasses.replace(model, num_classes=num_classes, denoising=denoising)


def _same_classes(weights: PretrainedWeights, model: DetectionModel) -> bool:
    return (
        weights.model.num_classes == model.num_classes
        and weights.model.class_activation == model.class_activation
    )


def transfer_weights(model: DetectionModel, weights: PretrainedWeights) -> TransferReport:
    """Load ``weights`` into ``model`` (freshly built, so its class heads carry their initial
    values): every tensor of the model comes from the weights, except the class-dependent
    ones (:meth:`DetectionModel.class_dependent_keys`) when the class count or activation
    differs, or when the weights lack them (for instance a denoising label embedding), and
    the per-query embeddings (:meth:`DetectionModel.query_dependent_keys`) when the number
    of queries differs.

    Raises :class:`ConfigError` listing the tensors that are missing from the weights or
    have another shape (an architecture the config comparison did not catch).
    """
    report = TransferReport(weights.source)
    current = model.state_dict()
    class_keys = set(model.class_dependent_keys())
    query_keys = set(model.query_dependent_keys())
    keep_classes = _same_classes(weights, model)
    merged: dict[str, Tensor] = {}
    missing, misshaped = [], []
    for key, value in current.items():
        theirs = weights.state.get(key)
        fits = theirs is not None and tuple(theirs.shape) == tuple(value.shape)
        if (key in class_keys and not (keep_classes and fits)) or (key in query_keys and not fits):
            report.reinitialised.append(key)
            merged[key] = value
        elif fits:
            report.loaded.append(key)
            merged[key] = theirs.to(dtype=value.dtype, device=value.device)
        else:
            (missing if theirs is None else misshaped).append(key)
    if missing or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:3])})")
        if misshaped:
            k = misshaped[0]
            parts.append(
                f"other shapes for {len(misshaped)} ({k}: {tuple(weights.state[k].shape)} vs "
                f"{tuple(current[k].shape)})"
            )
        raise ConfigError(
            f"{weights.source}: the weights do not fit this model's architecture: "
            f"{'; '.join(parts)}"
        )
    report.unused = [k for k in weights.state if k not in current]
    with torch.no_grad():
        model.load_state_dict(merged, strict=True)
    return report
