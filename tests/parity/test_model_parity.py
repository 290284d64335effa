"""Converted official checkpoints reproduce the official forward outputs (eval mode).

Every fixture in ``DETRKIT_PARITY_FIXTURES`` is covered; a fixture whose family has no
converter yet is an expected failure (strict), never a skip.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from functools import lru_cache

import pytest
import torch

from detrkit.config import to_dict
from detrkit.convert import available_families, from_official, load_official
from tests.parity.fixtures import fixture_names, load_fixture

pytestmark = pytest.mark.parity

# float32 implementation vs float32 official outputs / float64 vs float64 (README suggestions)
ATOL_FP32 = {"logits": 1e-3, "boxes": 2e-4}
ATOL_FP64 = {"logits": 1e-5, "boxes": 1e-6}


def _params(names: list[str]) -> list:
    out = []
    supported = set(available_families())
    for name in names:
        family = load_fixture(name).family
        marks = () if family in supported else pytest.mark.xfail(
            strict=True, reason=f"no converter for the '{family}' family yet")
        out.append(pytest.param(name, marks=marks, id=name))
    return out


ALL = _params(fixture_names())
DETR_FIXTURES = [n for n in fixture_names() if load_fixture(n).family == "detr"]


@lru_cache(maxsize=None)
def _converted(name: str):
    fx = load_fixture(name)
    return from_official(fx.state_dict(), official_args=fx.meta["official_args"])


def _run(model, fx, dtype: torch.dtype):
    t = fx.tensors
    with torch.no_grad():
        return model(t["inputs.images"].to(dtype), t["inputs.mask"])


def _compare(out, fx, prefix: str, atol: dict[str, float]) -> None:
    t = fx.tensors
    pairs = [("final", out.logits, out.boxes, f"{prefix}.")]
    n_aux = 0
    while f"{prefix}.aux_outputs.{n_aux}.pred_logits" in t:
        n_aux += 1
    assert len(out.aux) == n_aux, f"{len(out.aux)} aux outputs, official has {n_aux}"
    pairs += [(f"aux {i}", a.logits, a.boxes, f"{prefix}.aux_outputs.{i}.")
              for i, a in enumerate(out.aux)]
    for enc_key in ("enc_outputs", "interm_outputs"):
        if f"{prefix}.{enc_key}.pred_logits" in t:
            assert out.enc is not None, f"official has {enc_key} but the model returned no enc"
            pairs.append((enc_key, out.enc.logits, out.enc.boxes, f"{prefix}.{enc_key}."))
    for what, logits, boxes, key in pairs:
        ref_logits, ref_boxes = t[key + "pred_logits"], t[key + "pred_boxes"]
        assert logits.dtype == ref_logits.dtype
        torch.testing.assert_close(logits, ref_logits, atol=atol["logits"], rtol=0,
                                   msg=lambda m: f"{fx.name} {what} logits: {m}")
        torch.testing.assert_close(boxes, ref_boxes, atol=atol["boxes"], rtol=0,
                                   msg=lambda m: f"{fx.name} {what} boxes: {m}")


@pytest.mark.parametrize("name", ALL)
def test_outputs_float32(name):
    fx = load_fixture(name)
    _compare(_run(_converted(name), fx, torch.float32), fx, "outputs", ATOL_FP32)


@pytest.mark.parametrize("name", ALL)
def test_outputs_float64(name):
    fx = load_fixture(name)
    model = copy.deepcopy(_converted(name)).double()
    _compare(_run(model, fx, torch.float64), fx, "outputs_fp64", ATOL_FP64)


@pytest.mark.parametrize("name", ALL)
def test_official_pth_file(name, tmp_path):
    """An official-style .pth ({"model", "args": Namespace}) loads with weights_only=True."""
    fx = load_fixture(name)
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": fx.state_dict(), "args": argparse.Namespace(**fx.meta["official_args"]),
                "epoch": 3}, path)
    converted = load_official(path)  # architecture from the stored args only
    assert converted.family == fx.family
    _compare(_run(converted.model, fx, torch.float32), fx, "outputs", ATOL_FP32)


@pytest.mark.parametrize("name", ALL)
def test_safetensors_file(name, tmp_path):
    from safetensors.torch import save_file

    fx = load_fixture(name)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in fx.state_dict().items()}, str(path))
    model = from_official(path, official_args=fx.meta["official_args"])
    _compare(_run(model, fx, torch.float32), fx, "outputs", ATOL_FP32)


@pytest.mark.parametrize("name", DETR_FIXTURES)
def test_detr_shape_inference(name):
    """Only what the weights cannot tell (nheads, dilation, dropout, aux_loss) is passed; the
    rest (depth, widths, layer / query / class counts, pre-norm, position kind) is inferred
    and gives the same config and outputs."""
    fx = load_fixture(name)
    args = fx.meta["official_args"]
    full = load_official(fx.state_dict(), official_args=args)
    unknowable = ("nheads", "dilation", "dropout", "aux_loss")
    partial = load_official(fx.state_dict(), official_args={k: args[k] for k in unknowable})
    assert to_dict(partial.config.model) == to_dict(full.config.model)
    _compare(_run(partial.model, fx, torch.float32), fx, "outputs", ATOL_FP32)


@pytest.mark.parametrize("name", DETR_FIXTURES)
def test_detr_no_args_warns_for_the_unknowable(name):
    fx = load_fixture(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted = load_official(fx.state_dict())
    messages = " ".join(str(w.message) for w in caught)
    assert "'nheads'" in messages and "'dilation'" in messages
    t = converted.config.model.transformer
    cfg = fx.meta["config"]
    assert (t.hidden_dim, t.enc_layers, t.dec_layers, t.dim_feedforward, t.pre_norm) == (
        cfg["hidden_dim"], cfg["enc_layers"], cfg["dec_layers"], cfg["dim_feedforward"],
        cfg["pre_norm"])
    assert converted.config.model.num_classes == cfg["num_classes"]
    assert converted.config.model.queries.num_queries == cfg["num_queries"]
    assert t.nheads == 8  # the documented default when nothing says otherwise


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ALL)
def test_outputs_on_cuda(name):
    """The converted model follows the device of its inputs and keeps float32 parity on CUDA
    (TF32 disabled: it is a speed setting, not part of the model)."""
    fx = load_fixture(name)
    model = copy.deepcopy(_converted(name)).cuda()
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
    _compare(out, fx, "outputs", ATOL_FP32)
