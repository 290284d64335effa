"""Renaming state-dict keys between an upstream layout and detrkit's, in both directions.

A :class:`KeyRule` maps a key prefix of the upstream model to a prefix of detrkit's.
``{n}``-style placeholders (any name in braces) match a non-negative integer and are carried
over, so one rule covers every layer index. Rules are tried in order; the first match wins.
Because rules are plain prefix pairs they are invertible: :func:`rename` with
``reverse=True`` writes upstream key names back (used by tests and ``to_official``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

__all__ = [
    "ConversionError",
    "KeyRule",
    "rename",
    "drop_aliases",
    "load_strict",
    "BACKBONE_RULES",
    "LEARNED_POSITION_RULES",
    "SINGLE_LEVEL_NECK_RULES",
    "MULTI_LEVEL_NECK_RULES",
    "DEFORMABLE_DECODER_RULES",
    "per_layer_head_rules",
]


class ConversionError(ValueError):
    """A checkpoint does not fit the model it is converted to; the message lists the keys."""


_PLACEHOLDER = re.compile(r"\{(\w+)\}")


def _compile(pattern: str) -> re.Pattern[str]:
    parts = _PLACEHOLDER.split(pattern)  # literal, name, literal, name, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>\\d+)" for i, p in enumerate(parts))
    return re.compile(regex)


@dataclass(frozen=True)
class KeyRule:
    """``official`` prefix <-> ``detrkit`` prefix, e.g.
    ``KeyRule("transformer.decoder.layers.{n}.multihead_attn.", "transformer.decoder.layers.{n}.cross_attn.")``.
    A prefix ending without a dot (a full key) matches only that key."""

    official: str
    detrkit: str

    @cached_property
    def _official_re(self) -> re.Pattern[str]:
        return _compile(self.official)

    @cached_property
    def _detrkit_re(self) -> re.Pattern[str]:
        return _compile(self.detrkit)

    def apply(self, key: str, reverse: bool = False) -> str | None:
        """The renamed key, or ``None`` when the rule does not match ``key``."""
        src, template = (
            (self._detrkit_re, self.official) if reverse else (self._official_re, self.detrkit)
        )
        m = src.match(key)
        if m is None:
            return None
        rest = key[m.end() :]
        if rest and not (m.group(0).endswith(".") or rest.startswith(".")):
            return None  # "layers.1" must not match "layers.10"
        return template.format(**m.groupdict()) + rest


# shared by every family: official Joiner = Sequential(backbone, position encoding)
BACKBONE_RULES: tuple[KeyRule, ...] = (KeyRule("backbone.0.body.", "backbone.body."),)
LEARNED_POSITION_RULES: tuple[KeyRule, ...] = (
    KeyRule("backbone.1.row_embed.", "position.row_embed."),
    KeyRule("backbone.1.col_embed.", "position.col_embed."),
)
SINGLE_LEVEL_NECK_RULES: tuple[KeyRule, ...] = (KeyRule("input_proj.", "neck.layers.0.0."),)
MULTI_LEVEL_NECK_RULES: tuple[KeyRule, ...] = (
    KeyRule("input_proj.{level}.{part}.", "neck.layers.{level}.{part}."),
)
# the official deformable decoder layers normalise cross-attention with norm1 and
# self-attention with norm2; detrkit's layers number the blocks in order of use
DEFORMABLE_DECODER_RULES: tuple[KeyRule, ...] = (
    KeyRule("transformer.decoder.layers.{n}.norm1.", "transformer.decoder.layers.{n}.norm2."),
    KeyRule("transformer.decoder.layers.{n}.norm2.", "transformer.decoder.layers.{n}.norm1."),
    KeyRule("transformer.decoder.layers.", "transformer.decoder.layers."),
)


def per_layer_head_rules() -> tuple[KeyRule, ...]:
    """``class_embed.{n}`` / ``bbox_embed.{n}`` -> ``transformer.heads.*`` (multi-head models)."""
    return (
        KeyRule("class_embed.{n}.", "transformer.heads.class_embed.{n}."),
        KeyRule("bbox_embed.{n}.", "transformer.heads.bbox_embed.{n}."),
    )


def rename(
    state: Mapping[str, Tensor],
    rules: Sequence[KeyRule],
    *,
    reverse: bool = False,
    ignore: Iterable[str] = (),
) -> tuple[dict[str, Tensor], list[str]]:
    """Rename every key of ``state`` with the first matching rule.

    Args:
        state: the source state dict.
        rules: the ordered rules.
        reverse: map detrkit keys to official ones instead.
        ignore: regexes of source keys that are dropped silently (e.g. ``num_batches_tracked``).

    Returns:
        the renamed state dict and the source keys no rule matched (in order).
    """
    ignored = [re.compile(p) for p in ignore]
    out: dict[str, Tensor] = {}
    unmatched: list[str] = []
    for key, value in state.items():
        if any(p.search(key) for p in ignored):
            continue
        for rule in rules:
            new = rule.apply(key, reverse=reverse)
            if new is not None:
                if new in out:
                    raise ConversionError(f"two keys map to '{new}' (second: '{key}')")
                out[new] = value
                break
        else:
            unmatched.append(key)
    return out, unmatched


def drop_aliases(state: dict[str, Tensor], aliases: Mapping[str, str], source: str) -> None:
    """Remove alias keys in place after checking each holds the same tensor as its canonical key.

    ``aliases`` maps alias key -> canonical key (both official names). A missing alias is fine;
    an alias whose canonical key is missing is renamed to it; differing values raise.
    """
    for alias, canonical in aliases.items():
        if alias not in state:
            continue
        value = state.pop(alias)
        if canonical not in state:
            state[canonical] = value
        elif not (value.shape == state[canonical].shape and torch.equal(value, state[canonical])):
            raise ConversionError(
                f"{source}: '{alias}' should be the same tensor as "
                f"'{canonical}' (shared module) but the values differ"
            )


def _listing(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_strict(
    model: nn.Module, state: Mapping[str, Tensor], source: str, unmatched: Sequence[str] = ()
) -> None:
    """Load ``state`` into ``model``: every key must exist with the right shape, and every
    model key must be provided. ``unmatched``: upstream keys no rule could place (reported too).
    Raises :class:`ConversionError` listing all offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = list(unmatched) + [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    problems = []
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if wrong:
        problems.append(f"shape mismatches (checkpoint vs model): {_listing(wrong)}")
    if problems:
        raise ConversionError(
            f"{source}: checkpoint does not fit the model; " + "; ".join(problems)
        )
    model.load_state_dict(dict(state), strict=True)
