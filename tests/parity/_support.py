"""What the parity modules share: parametrisation by fixture name, converted models (cached),
forward runs with the transformer's parts tapped, and the official layout of every tap.

Parametrisation reads only ``fixture.json`` (never the tensors), so a broken fixture fails its
own tests and cannot break the collection of anything else. A fixture whose ``fixture.json``
cannot be read is kept in every selection (its tests then fail instead of vanishing).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from detrkit.convert import OfficialModel, load_official
from detrkit.models.decoder import DecoderOutput
from detrkit.models.denoising import DenoisingQueries
from detrkit.models.queries import Queries
from detrkit.structures import DetectorOutput, Target
from tests.conftest import Fixture, fixture_family, fixture_meta, fixture_names, load_fixture

UNREADABLE = "unreadable"

# ------------------------------------------------------------------------------ tolerances
# Float32 noise of the official code (fixture.json["determinism"]["fp32_vs_fp64_max_abs_diff"],
# largest over the fixtures): logits 4.1e-4 (dab_detr), boxes 6.3e-5 (detr_r50). The taps'
# noise was measured the same way: detrkit in float64 (which reproduces the official float64
# outputs to 2e-14) against the official float32 taps. Largest: decoder states 4.2e-4
# (dab_detr; 3.1e-4 dn_dab_detr, 1.9e-4 detr_r50, <= 6.6e-5 for the deformable models), DETR
# memory 2.4e-4, DINO selected features 8.9e-5, references 9.8e-6 (dab_detr; <= 2.2e-6 for
# the others), two-stage encoder logits 5.8e-5, proposals before the sigmoid 1.6e-5.
# detrkit float32 vs official float32 stays below these maxima (decoder states 3.0e-4 on
# dab_detr, the case that breaks a 1e-4 limit). Each limit is 2.4-6x the largest noise.
ATOL = {
    "logits": 1e-3,  # class logits (README suggestion; noise <= 4.1e-4)
    "boxes": 2e-4,  # predicted boxes after the sigmoid (README suggestion; noise <= 6.3e-5)
    "hidden": 1e-3,  # decoder / encoder states, selected features (noise <= 4.2e-4)
    "refs": 5e-5,  # reference boxes / points after the sigmoid (noise <= 9.8e-6)
    "unact": 1e-4,  # proposal boxes before the sigmoid (noise <= 1.6e-5)
}
# float64 detrkit vs ``outputs_fp64.*``: observed <= 1.7e-14 on every output (README suggests
# 1e-5 / 1e-6 because the official float64 run keeps a few float32 islands; detrkit keeps them too)
ATOL_FP64 = {"logits": 1e-9, "boxes": 1e-9}


def close(
    actual: Tensor, expected: Tensor, kind: str, what: str, atol: dict[str, float] = ATOL
) -> None:
    """``actual`` equals ``expected`` (same shape and dtype) up to ``atol[kind]``."""
    assert actual.shape == expected.shape, (
        f"{what}: shape {tuple(actual.shape)}, official {tuple(expected.shape)}"
    )
    torch.testing.assert_close(
        actual,
        expected,
        atol=atol[kind],
        rtol=0,
        msg=lambda m: f"{what} ({kind}, atol {atol[kind]}): {m}",
    )


# ------------------------------------------------------------------------------ selection


def _meta_says(name: str, where: Callable[[dict], bool]) -> bool:
    try:
        return bool(where(fixture_meta(name)))
    except (OSError, ValueError, KeyError, TypeError):
        return True  # unreadable: keep it, its tests fail


def names(
    families: Iterable[str] | None = None,
    train_dn: bool = False,
    where: Callable[[dict], bool] | None = None,
) -> list[str]:
    """Fixture names to parametrise over, at collection time. :func:`fixture_names` raises on a
    missing or empty folder; ``families`` keeps those families, ``train_dn`` those with
    training-mode denoising data, ``where`` those whose ``fixture.json`` satisfies it."""
    wanted = None if families is None else set(families)
    out = []
    for name in fixture_names():
        family = fixture_family(name)
        if family != UNREADABLE and wanted is not None and family not in wanted:
            continue
        if train_dn and not _meta_says(name, lambda m: m["train_dn"]):
            continue
        if where is not None and not _meta_says(name, where):
            continue
        out.append(name)
    return out


# ------------------------------------------------------------------------------ models


@cache
def official_state(name: str) -> dict[str, Tensor]:
    """The fixture's merged official state dict in float32 (cached: do not modify)."""
    return load_fixture(name).state_dict()


@cache
def converted(name: str) -> OfficialModel:
    """The fixture's official weights and args converted to detrkit (float32, eval mode).
    A family without a converter raises here, so its tests fail."""
    fx = load_fixture(name)
    return load_official(official_state(name), official_args=fx.meta["official_args"])


def targets(fx: Fixture) -> list[Target]:
    return [Target(boxes=t["boxes"], labels=t["labels"]) for t in fx.targets()]


@dataclass
class Run:
    """One forward with the transformer's parts tapped (forward hooks, math unchanged).

    levels: the transformer's inputs ``(srcs, masks, pos)``. memory: encoder output
    ``[B, S, d]``. queries: the :class:`Queries`. decoder: the :class:`DecoderOutput`.
    dn_queries: what the denoising branch drew (``None`` when it was not called)."""

    out: DetectorOutput
    levels: tuple[list[Tensor], list[Tensor], list[Tensor]]
    memory: Tensor
    queries: Queries
    decoder: DecoderOutput
    dn_queries: DenoisingQueries | None


def tapped(model, call: Callable[[], DetectorOutput]) -> Run:
    """Run ``call()`` with forward hooks on ``model.transformer`` and its encoder, queries,
    decoder (and denoising branch); every part must run exactly once."""
    part = model.transformer
    seen: dict[str, list] = {
        "levels": [],
        "memory": [],
        "queries": [],
        "decoder": [],
        "dn_queries": [],
    }
    hooks = [
        part.register_forward_pre_hook(lambda m, args: seen["levels"].append(tuple(args[:3]))),
        part.encoder.register_forward_hook(lambda m, a, o: seen["memory"].append(o)),
        part.queries.register_forward_hook(lambda m, a, o: seen["queries"].append(o)),
        part.decoder.register_forward_hook(lambda m, a, o: seen["decoder"].append(o)),
    ]
    if part.denoising is not None:
        hooks.append(
            part.denoising.register_forward_hook(lambda m, a, o: seen["dn_queries"].append(o))
        )
    try:
        out = call()
    finally:
        for h in hooks:
            h.remove()
    for key in ("levels", "memory", "queries", "decoder"):
        assert len(seen[key]) == 1, f"transformer part '{key}' ran {len(seen[key])} times"
    assert len(seen["dn_queries"]) <= 1
    return Run(
        out,
        seen["levels"][0],
        seen["memory"][0],
        seen["queries"][0],
        seen["decoder"][0],
        seen["dn_queries"][0] if seen["dn_queries"] else None,
    )


@cache
def eval_run(name: str) -> Run:
    """The converted model's eval-mode float32 forward on the fixture inputs, tapped (cached:
    do not modify the tensors)."""
    fx, model = load_fixture(name), converted(name).model
    t = fx.tensors
    with torch.no_grad():
        return tapped(model, lambda: model(t["inputs.images"], t["inputs.mask"]))


def transformer_run(
    name: str,
    train: bool,
    targets_: list[Target] | None = None,
    dn_queries: DenoisingQueries | None = None,
    grad: bool = False,
) -> Run:
    """The converted model's transformer on the cached eval-run inputs (backbone, neck and
    position encodings have no randomness and no train-mode behaviour here), tapped."""
    model = converted(name).model
    srcs, masks, pos = eval_run(name).levels
    model.train(train)
    try:
        with torch.set_grad_enabled(grad):
            return tapped(
                model, lambda: model.transformer(srcs, masks, pos, targets_, dn_queries=dn_queries)
            )
    finally:
        model.eval()


# ------------------------------------------------------------------------------ official taps


def official_taps(family: str, run: Run) -> dict[str, tuple[Tensor, str]]:
    """detrkit's tensors in the layout of the official ``taps.transformer_return.{i}``, each
    with its tolerance kind (README, *Taps*)."""
    dec, q, enc = run.decoder, run.queries, run.queries.enc
    refs = dec.references
    if family == "detr":
        src = run.levels[0][0]  # [B, d, h, w]
        memory = run.memory.transpose(1, 2).reshape(src.shape)
        return {"0": (dec.hidden, "hidden"), "1": (memory, "hidden")}
    if family in ("dab_detr", "dn_dab_detr"):  # the anchor fed into each layer
        return {"0": (dec.hidden, "hidden"), "1": (torch.stack(refs[:-1]), "refs")}
    if family == "dino":
        assert enc is not None and q.selected is not None
        return {
            "0": (dec.hidden, "hidden"),
            "1": (torch.stack(refs), "refs"),
            "2": (q.selected[None], "hidden"),
            "3": (enc.boxes[None], "refs"),
            "4": (enc.anchors, "refs"),
        }
    if family in ("deformable_detr", "dab_deformable_detr", "dn_deformable_detr"):
        initial = refs[0]
        if family == "dab_deformable_detr":  # learned anchors, returned once: [Q, 4]
            assert torch.equal(initial, initial[:1].expand_as(initial))
            initial = initial[0]
        taps = {
            "0": (dec.hidden, "hidden"),
            "1": (initial, "refs"),
            "2": (torch.stack(refs[1:]), "refs"),
        }
        if enc is not None:  # two-stage: every encoder token
            taps["3"] = (enc.logits, "logits")
            taps["4"] = (torch.logit(enc.boxes.double()).to(enc.boxes.dtype), "unact")
        return taps
    raise AssertionError(f"no tap layout for family '{family}'")
