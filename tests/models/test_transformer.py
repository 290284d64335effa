"""The detection transformer as a whole: denoising queries, padding, injected queries."""

import pytest
import torch

from detrkit.models import SinePositionEncoding
from detrkit.models.denoising import DenoisingQueries
from tests.conftest import levels_input, random_targets, small_transformer

SHAPES = [(6, 8), (3, 4), (2, 2), (1, 1)]


def _inputs(part, batch=2):
    shapes = SHAPES[: part.num_levels]
    return levels_input(shapes, shapes, batch=batch)


@pytest.mark.parametrize(
    "preset", ["test_dn_detr_tiny", "test_dn_deformable_detr_tiny", "test_dino_tiny"]
)
@pytest.mark.parametrize("counts", [[2, 5], [0, 3], [0, 0], [12, 1]])
def test_denoising_queries_do_not_leak_into_matching_outputs(preset, counts):
    """Matching queries never attend to denoising slots: their outputs are those of a forward
    without denoising (an image without boxes, a batch without boxes, uneven counts)."""
    part = small_transformer(preset).train()
    srcs, masks, pos = _inputs(part)
    targets = random_targets(counts, num_classes=5)
    torch.manual_seed(1)
    with_dn = part(srcs, masks, pos, targets)
    without = part(srcs, masks, pos)
    assert without.dn is None and with_dn.dn is not None
    per_group = (2 if preset == "test_dino_tiny" else 1) * max(counts)
    assert with_dn.dn.meta.pad_size == per_group * with_dn.dn.meta.num_groups
    assert len(with_dn.dn.layers) == 3 and with_dn.logits.shape == without.logits.shape
    torch.testing.assert_close(with_dn.logits, without.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_dn.aux[0].boxes, without.aux[0].boxes, atol=1e-6, rtol=0)
    # the label embedding takes part in the graph even without any box
    (with_dn.logits.sum() + sum(x.logits.sum() for x in with_dn.dn.layers)).backward()
    assert part.denoising.label_enc.weight.grad is not None


def test_denoising_groups_are_isolated():
    part = small_transformer("test_dn_deformable_detr_tiny").train()
    srcs, masks, pos = _inputs(part)
    targets = random_targets([3, 2], num_classes=5)
    queries = part.denoising(targets, part.queries.num_matching)
    assert queries.meta.num_groups == 3 and queries.meta.group_size == 3
    out = part(srcs, masks, pos, dn_queries=queries)
    changed = DenoisingQueries(
        queries.content.clone(), queries.boxes_unact.clone(), queries.attn_mask, queries.meta
    )
    changed.content[:, 3:6] += 1.0  # group 1 only
    changed.boxes_unact[:, 3:6] -= 0.5
    out2 = part(srcs, masks, pos, dn_queries=changed)
    a, b = out.dn.layers[-1].logits, out2.dn.layers[-1].logits
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=0)
    torch.testing.assert_close(a[:, 6:], b[:, 6:], atol=1e-6, rtol=0)
    assert (a[:, 3:6] - b[:, 3:6]).abs().max() > 1e-3
    torch.testing.assert_close(out.logits, out2.logits, atol=1e-6, rtol=0)
    bad = DenoisingQueries(
        queries.content[:, :, :-1], queries.boxes_unact, queries.attn_mask, queries.meta
    )
    with pytest.raises(ValueError, match="dn_queries: expected content"):
        part(srcs, masks, pos, dn_queries=bad)


def test_no_denoising_in_eval_or_without_targets():
    part = small_transformer("test_dino_tiny")
    srcs, masks, pos = _inputs(part)
    targets = random_targets([2, 1], num_classes=5)
    assert part.eval()(srcs, masks, pos, targets).dn is None
    assert part.train()(srcs, masks, pos, None).dn is None


@pytest.mark.parametrize(
    "preset",
    [
        "test_deformable_detr_tiny",
        "test_deformable_detr_tiny_refine",
        "test_deformable_detr_tiny_two_stage",
    ],
)
def test_padded_image_gives_the_same_detections_as_unpadded(preset):
    """Deformable attention samples relative to the valid image. (Anchor decoders embed their
    anchors relative to the padded first level, as the official code does, so they are not
    padding-invariant.)"""
    part = small_transformer(preset, "model.queries.num_queries=4")
    valid = [(8, 10), (4, 5), (2, 3), (1, 2)]
    padded = [(11, 13), (6, 7), (3, 4), (2, 2)]
    srcs, masks, _ = levels_input(padded, valid, batch=2)
    for m in masks:  # the second image fills the batch: only the first one is padded
        m[1] = False
    encoding = SinePositionEncoding(16, offset=0.5)
    single = [s[:1, :, :h, :w] for s, (h, w) in zip(srcs, valid)]
    single_masks = [torch.zeros(1, h, w, dtype=torch.bool) for h, w in valid]
    with torch.no_grad():
        out_pad = part(srcs, masks, [encoding(m) for m in masks])
        out_one = part(single, single_masks, [encoding(m) for m in single_masks])
    torch.testing.assert_close(out_pad.logits[:1], out_one.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_pad.boxes[:1], out_one.boxes, atol=1e-5, rtol=1e-5)
    if out_pad.enc is not None:
        tokens = ~torch.cat([m[:1].flatten(1) for m in masks], 1)[0]
        torch.testing.assert_close(
            out_pad.enc.logits[0, tokens], out_one.enc.logits[0], atol=1e-4, rtol=1e-4
        )
        assert (out_pad.enc.boxes[0, ~tokens] == 1.0).all()


@pytest.mark.parametrize("preset", ["test_dab_detr_tiny", "test_detr_tiny"])
def test_global_attention_ignores_padding(preset):
    part = small_transformer(preset)
    srcs, masks, _ = levels_input([(4, 5)], [(4, 5)], batch=1)
    big = torch.randn(1, 32, 4, 7) * 5
    big[..., :5] = srcs[0]
    mask = torch.zeros(1, 4, 7, dtype=torch.bool)
    mask[..., 5:] = True
    encoding = SinePositionEncoding(16, offset=0.5)
    with torch.no_grad():
        alone = part(srcs, masks, [encoding(masks[0])])
        padded = part([big], [mask], [encoding(mask)])
    torch.testing.assert_close(alone.logits, padded.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.boxes, padded.boxes, atol=1e-6, rtol=0)
