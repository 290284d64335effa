"""The decoder loop: positional queries, query scale, width/height modulation, the final norm
and the three box updates, with either attention."""

import pytest
import torch

from detrkit.models.embeddings import box_sine_embedding
from tests.conftest import levels_input, small_transformer

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]


def _run(part, valid=None, batch=1, grad=False):
    """Forward on random levels; returns the output and the decoder's DecoderOutput."""
    shapes = SHAPES[: part.num_levels]
    srcs, masks, pos = levels_input(shapes, valid or shapes, batch=batch)
    captured = {}
    handle = part.decoder.register_forward_hook(lambda m, a, out: captured.update(dec=out))
    with torch.set_grad_enabled(grad):
        out = part(srcs, masks, pos)
    handle.remove()
    return out, captured["dec"]


def test_refine_switches_from_points_to_boxes_and_detaches():
    part = small_transformer("test_deformable_detr_tiny_refine")
    assert len(part.heads.class_embed) == 3 and len(part.heads.bbox_embed) == 3
    out, dec = _run(part, grad=True)
    refs = dec.references
    assert len(refs) == 4 and refs[0].shape[-1] == 2 and all(r.shape[-1] == 4 for r in refs[1:])
    assert not any(r.requires_grad for r in refs[1:])
    # without a final norm, layer i's predicted box is the reference of layer i + 1
    torch.testing.assert_close(out.aux[1].boxes, refs[2])
    out.boxes.sum().backward()  # the last boxes do not reach the earlier box heads
    assert part.heads.bbox_embed[1].layers[0].weight.grad is None
    assert part.heads.bbox_embed[2].layers[0].weight.grad is not None


def test_without_refinement_references_stay_fixed():
    part = small_transformer("test_deformable_detr_tiny")
    assert len(part.heads.bbox_embed) == 1
    _, dec = _run(part)
    assert all(r is dec.references[0] for r in dec.references)


@pytest.mark.parametrize(
    "preset",
    ["test_deformable_detr_tiny_refine", "test_dab_detr_tiny", "test_dino_tiny", "test_detr_tiny"],
)
@pytest.mark.parametrize("update,reaches", [("look_forward_twice", True), ("refine", False)])
def test_look_forward_twice_lets_the_next_layer_train_the_previous_box(preset, update, reaches):
    part = small_transformer(
        preset, f"model.queries.box_update={update}", "model.heads.share_decoder_box=false"
    )
    out, _ = _run(part, grad=True)
    out.boxes.sum().backward()  # last layer only: it reaches layer L-2's box head through
    grad = part.heads.bbox_embed[1].layers[0].weight.grad  # the undetached reference
    assert (grad is not None and grad.abs().sum() > 0) == reaches


@pytest.mark.parametrize(
    "preset", ["test_dab_deformable_detr_tiny", "test_detr_tiny", "test_dab_detr_tiny"]
)
def test_query_scale_starts_at_the_second_layer(preset):
    part = small_transformer(preset, "model.transformer.decoder_query_scale=true")
    _, before = _run(part)
    with torch.no_grad():
        last = part.decoder.query_scale.layers[-1]
        last.weight.zero_()
        last.bias.fill_(3.0)
    _, after = _run(part)
    torch.testing.assert_close(before.hidden[0], after.hidden[0])
    assert not torch.allclose(before.hidden[1], after.hidden[1], atol=1e-4)


def test_decoder_norm_feeds_the_heads_but_not_the_box_update():
    normed = small_transformer("test_dino_tiny")
    plain = small_transformer("test_dino_tiny", "model.transformer.decoder_norm=false")
    plain.load_state_dict(normed.state_dict(), strict=False)
    out_n, dec_n = _run(normed)
    out_p, dec_p = _run(plain)
    torch.testing.assert_close(dec_n.references[1], dec_p.references[1])
    torch.testing.assert_close(dec_n.hidden[0], normed.decoder.norm(dec_p.hidden[0]))
    assert not torch.allclose(out_n.aux[0].logits, out_p.aux[0].logits, atol=1e-4)


@pytest.mark.parametrize(
    "preset,scaled", [("test_dab_deformable_detr_tiny", True), ("test_dab_detr_tiny", False)]
)
def test_anchor_positions_are_embedded_in_the_frame_the_attention_sees(preset, scaled):
    part = small_transformer(preset)
    seen = {}
    part.decoder.ref_point_head.register_forward_hook(
        lambda m, args, out: seen.update(sine=seen.get("sine", args[0]))
    )
    valid = [(max(1, h - 2), max(1, w - 3)) for h, w in SHAPES[: part.num_levels]]
    _, dec = _run(part, valid=valid)
    anchor = dec.references[0]
    if scaled:  # deformable: the anchor relative to the padded first level
        ratio = torch.tensor([[5 / 8, 4 / 6]]).repeat(1, 2)
        anchor = anchor * ratio
    torch.testing.assert_close(seen["sine"], box_sine_embedding(anchor, 16))


def test_conditional_layers_and_width_height_modulation():
    part = small_transformer("test_dab_detr_tiny")
    keys = part.state_dict()
    assert "decoder.layers.0.cross_attn.qpos_proj.weight" in keys
    assert not any(k.startswith("decoder.layers.1.cross_attn.qpos_proj") for k in keys)
    assert part.decoder.ref_anchor_head is not None
    out, _ = _run(part)
    flat = small_transformer("test_dab_detr_tiny", "model.transformer.modulate_hw_attn=false")
    assert flat.decoder.ref_anchor_head is None
    flat.load_state_dict(part.state_dict(), strict=False)
    assert not torch.allclose(out.logits, _run(flat)[0].logits, atol=1e-4)
