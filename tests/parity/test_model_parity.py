"""Converted official checkpoints reproduce the official forward outputs (eval mode).

Every fixture in ``DETRKIT_PARITY_FIXTURES`` is covered (a family without a converter fails):
``outputs.*`` in float32 and ``outputs_fp64.*`` in float64, aux layers, two-stage
``enc_outputs``, DINO ``interm_outputs`` and ``interm_outputs_for_matching_pre`` (logits and the
proposals' anchors, ``enc.anchors``). Loading from an official ``.pth`` / ``.safetensors`` file
gives the very same model.
"""

from __future__ import annotations

import argparse
import copy
import warnings

import pytest
import torch

from detrkit.config import to_dict
from detrkit.convert import load_official
from tests.conftest import Fixture, load_fixture
from tests.parity._support import ATOL, ATOL_FP64, close, converted, eval_run, names, official_state

pytestmark = pytest.mark.parity

ALL = names()
DETR_FIXTURES = names(["detr"])


def _pairs(out, fx: Fixture, prefix: str) -> list[tuple[str, torch.Tensor, torch.Tensor, str]]:
    """(what, logits, boxes, official key prefix) of every stored output group."""
    t = fx.tensors
    pairs = [("final", out.logits, out.boxes, f"{prefix}.")]
    n_aux = 0
    while f"{prefix}.aux_outputs.{n_aux}.pred_logits" in t:
        n_aux += 1
    assert len(out.aux) == n_aux, f"{len(out.aux)} aux outputs, official has {n_aux}"
    pairs += [
        (f"aux {i}", a.logits, a.boxes, f"{prefix}.aux_outputs.{i}.") for i, a in enumerate(out.aux)
    ]
    groups = [
        g
        for g in ("enc_outputs", "interm_outputs", "interm_outputs_for_matching_pre")
        if f"{prefix}.{g}.pred_logits" in t
    ]
    assert (out.enc is not None) == bool(groups), f"enc {out.enc is not None}, official {groups}"
    for group in groups:
        # interm_outputs_for_matching_pre: the same logits, boxes = the raw proposals; these
        # are float32 in a float64 run too (official: fp32-vs-fp64 difference 0.0)
        boxes = (
            out.enc.boxes if not group.endswith("_pre") else out.enc.anchors.to(out.enc.boxes.dtype)
        )
        pairs.append((group, out.enc.logits, boxes, f"{prefix}.{group}."))
    expected = {k.rsplit(".", 1)[0] + "." for k in t if k.startswith(prefix + ".")}
    assert {key for *_, key in pairs} == expected, "stored output groups not compared"
    return pairs


def _compare(out, fx: Fixture, prefix: str, atol: dict[str, float]) -> None:
    for what, logits, boxes, key in _pairs(out, fx, prefix):
        close(logits, fx.tensors[key + "pred_logits"], "logits", f"{fx.name} {what}", atol)
        close(boxes, fx.tensors[key + "pred_boxes"], "boxes", f"{fx.name} {what}", atol)


def _run(model, fx: Fixture, dtype: torch.dtype):
    t = fx.tensors
    with torch.no_grad():
        return model(t["inputs.images"].to(dtype), t["inputs.mask"])


def _same_model(loaded, name: str) -> None:
    """``loaded`` (an OfficialModel) is the cached conversion: same family, config and every
    parameter / buffer bit for bit, in eval mode (so its outputs are the tested ones)."""
    ref = converted(name)
    assert loaded.family == ref.family
    assert to_dict(loaded.config.model) == to_dict(ref.config.model)
    assert not loaded.model.training
    ours, theirs = loaded.model.state_dict(), ref.model.state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("name", ALL)
def test_outputs_float32(name: str) -> None:
    fx = load_fixture(name)
    _compare(eval_run(name).out, fx, "outputs", ATOL)


@pytest.mark.parametrize("name", ALL)
def test_outputs_float64(name: str) -> None:
    """Float64 model and images: ``outputs_fp64.*`` to 1e-9 (observed <= 2e-14: detrkit keeps
    the float32 islands of the official float64 run, e.g. the sine embeddings)."""
    fx = load_fixture(name)
    model = copy.deepcopy(converted(name).model).double()
    out = _run(model, fx, torch.float64)
    assert out.logits.dtype == torch.float64
    _compare(out, fx, "outputs_fp64", ATOL_FP64)


@pytest.mark.parametrize("name", ALL)
def test_official_pth_file(name: str, tmp_path) -> None:
    """An official-style .pth ({"model", "args": Namespace}) loads with weights_only=True and
    the architecture from the stored args alone."""
    fx = load_fixture(name)
    path = tmp_path / "checkpoint.pth"
    args = argparse.Namespace(**fx.meta["official_args"])
    torch.save({"model": official_state(name), "args": args, "epoch": 3}, path)
    _same_model(load_official(path), name)


@pytest.mark.parametrize("name", ALL)
def test_safetensors_file(name: str, tmp_path) -> None:
    from safetensors.torch import save_file

    fx = load_fixture(name)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in official_state(name).items()}, str(path))
    _same_model(load_official(path, official_args=fx.meta["official_args"]), name)


@pytest.mark.parametrize("name", DETR_FIXTURES)
def test_detr_shape_inference(name: str) -> None:
    """Only what the weights cannot tell (nheads, dilation, dropout, aux_loss) is passed; the
    rest (depth, widths, layer / query / class counts, pre-norm, position kind) is inferred
    and gives the same model."""
    fx = load_fixture(name)
    args = fx.meta["official_args"]
    unknowable = ("nheads", "dilation", "dropout", "aux_loss")
    partial = load_official(official_state(name), official_args={k: args[k] for k in unknowable})
    _same_model(partial, name)


@pytest.mark.parametrize("name", DETR_FIXTURES)
def test_detr_no_args_warns_for_the_unknowable(name: str) -> None:
    fx = load_fixture(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load_official(official_state(name))
    messages = " ".join(str(w.message) for w in caught)
    assert "'nheads'" in messages and "'dilation'" in messages
    t = result.config.model.transformer
    cfg = fx.meta["config"]
    assert (t.hidden_dim, t.enc_layers, t.dec_layers, t.dim_feedforward, t.pre_norm) == (
        cfg["hidden_dim"],
        cfg["enc_layers"],
        cfg["dec_layers"],
        cfg["dim_feedforward"],
        cfg["pre_norm"],
    )
    assert result.config.model.num_classes == cfg["num_classes"]
    assert result.config.model.queries.num_queries == cfg["num_queries"]
    assert t.nheads == 8  # the documented default when nothing says otherwise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_outputs_on_cuda(name: str) -> None:
    """The converted model follows the device of its inputs and keeps float32 parity on CUDA
    (TF32 disabled: it is a speed setting, not part of the model)."""
    fx = load_fixture(name)
    model = copy.deepcopy(converted(name).model).cuda()
    t = fx.tensors
    matmul, conv = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            out = model(t["inputs.images"].cuda(), t["inputs.mask"].cuda())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, conv
    assert out.logits.is_cuda
    out.logits, out.boxes = out.logits.cpu(), out.boxes.cpu()
    for a in out.aux:
        a.logits, a.boxes = a.logits.cpu(), a.boxes.cpu()
    if out.enc is not None:
        out.enc.logits, out.enc.boxes = out.enc.logits.cpu(), out.enc.boxes.cpu()
        out.enc.anchors = out.enc.anchors.cpu()
    _compare(out, fx, "outputs", ATOL)
