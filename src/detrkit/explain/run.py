"""``explain(model, config, image)``: one forward pass with collectors attached, as typed tensors.

The model runs in eval mode without gradients, exactly as for prediction; the collectors only
read (see :mod:`detrkit.explain.collect`). The denoising view is a second pass with denoising
queries drawn from ground truth, as in a training step, still in eval mode (no dropout).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from detrkit.config import Config
from detrkit.data.collate import images_to_batch
from detrkit.data.images import as_image
from detrkit.data.transforms import build_transforms
from detrkit.explain.collect import Collector, Recording
from detrkit.explain.results import DenoisingView, Explanation, Proposals, Skipped, Trajectory
from detrkit.models.denoising import (
    DenoisingQueries,
    build_denoising_groups,
    denoising_attention_mask,
    embed_denoising_queries,
)
from detrkit.models.queries import encoder_proposals
from detrkit.structures import DetectorOutput, ImageBatch, Target

__all__ = ["explain", "prepare_image"]


def prepare_image(config: Config, image, device: torch.device | str = "cpu") -> ImageBatch:
    """``image`` (a path, PIL image, ``HWC`` uint8 array or ``CHW`` tensor) resized and
    normalised by the validation transforms of ``config.data``: a batch of one."""
    picture = as_image(image)
    size = (
        (picture.height, picture.width)
        if hasattr(picture, "height")
        else (int(picture.shape[-2]), int(picture.shape[-1]))
    )
    d = config.data
    tensor = build_transforms(d.augment, d.mean, d.std, train=False)(picture).image
    return images_to_batch([tensor], orig_sizes=[size]).to(device)


def _scores(logits: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """``[Q, C]`` logits -> best score ``[Q]`` and class ``[Q]`` (softmax: without no-object)."""
    probs = logits.sigmoid() if activation == "sigmoid" else logits.softmax(-1)[..., :-1]
    return probs.max(-1)


def _pixel(pixel: tuple[float, float] | None, box: Tensor, size: tuple[int, int]):
    """The pixel ``(x, y)`` (default: the centre of ``box``, normalised cxcywh) and it
    normalised to the image."""
    h, w = size
    if pixel is None:
        return (float(box[0]) * w, float(box[1]) * h), (float(box[0]), float(box[1]))
    x, y = pixel
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(
            f"pixel: ({x}, {y}) is outside the {w}x{h} image; give X in [0, {w}) and Y in [0, {h})"
        )
    return (float(x), float(y)), (x / w, y / h)


def explain(
    model: nn.Module,
    config: Config,
    image,
    *,
    top_k: int = 5,
    pixel: tuple[float, float] | None = None,
    targets: Target | None = None,
    seed: int = 0,
) -> Explanation:
    """Run ``model`` (a :class:`~detrkit.models.DetectionModel`, e.g. ``Detector.model``) on
    ``image`` with collectors attached and return what its mechanisms computed.

    Args:
        config: the model's config (its ``data`` section gives the resize and normalisation).
        image: a path, PIL image, ``HWC`` uint8 array or ``CHW`` tensor (not normalised).
        top_k: how many of the best-scoring queries the result ranks.
        pixel: ``(x, y)`` in image pixels of the encoder location to show (default: the centre
            of the best query's box).
        targets: ground truth for the denoising view (boxes normalised cxcywh, labels); None
            uses the ``top_k`` predictions as ground truth (``DenoisingView.source``).
        seed: of the random noise of the denoising view.
    """
    if top_k < 1:
        raise ValueError(f"top_k: must be >= 1, got {top_k}")
    device = next(model.parameters()).device
    batch = prepare_image(config, image, device)
    size = tuple(int(v) for v in batch.orig_sizes[0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if pixel is None:  # the best query's centre: a plain pass first
                first = model(batch.images, batch.mask)
                best = _scores(first.logits[0], model.class_activation)[0].argmax()
                pixel_xy, norm = _pixel(None, first.boxes[0, best], size)
            else:
                pixel_xy, norm = _pixel(pixel, torch.zeros(4), size)
            collector = Collector(model, norm)
            with collector as rec:
                out = model(batch.images, batch.mask)
            result = _explanation(model, out, rec, size, batch, top_k, pixel_xy, norm)
            _add_denoising(result, model, batch, targets, seed)
    finally:
        model.train(was_training)
    return result


def _explanation(
    model: nn.Module,
    out: DetectorOutput,
    rec: Recording,
    size: tuple[int, int],
    batch: ImageBatch,
    top_k: int,
    pixel_xy: tuple[float, float],
    norm: tuple[float, float],
) -> Explanation:
    from detrkit.explain.collect import pixel_token

    scores, labels = _scores(out.logits[0], model.class_activation)
    k = min(top_k, scores.shape[0])
    best = scores.topk(k).indices
    decoder = model.transformer.decoder
    references = rec.decoder.references if rec.decoder is not None else [None]
    initial = references[0][0].detach() if references[0] is not None else None
    trajectory = Trajectory(
        boxes=torch.stack([layer.boxes[0] for layer in rec.layers]),
        logits=torch.stack([layer.logits[0] for layer in rec.layers]),
        initial=initial,
        box_update=decoder.box_update,
    )
    result = Explanation(
        image_size=size,
        input_size=tuple(int(v) for v in batch.sizes[0]),
        output=DetectorOutput(out.logits, out.boxes, rec.layers[:-1], out.enc, out.dn),
        top_queries=best,
        scores=scores[best],
        labels=labels[best],
        pixel=pixel_xy,
        token=pixel_token(rec.levels, norm),
        class_activation=model.class_activation,
        trajectory=trajectory,
        decoder_sampling=rec.decoder_sampling,
        encoder_sampling=rec.encoder_sampling,
        cross_attention=rec.cross_attention,
        encoder_attention=rec.encoder_attention,
        proposals=_proposals(model, rec),
    )
    result.skipped = _not_applicable(model, result)
    return result


def _nearest(rows: Tensor, table: Tensor, chunk: int = 64) -> Tensor:
    """Index ``[N]`` of the row of ``table`` ``[S, 4]`` equal (nearest) to each of ``rows``
    ``[N, 4]``, in chunks (``N x S`` can be large)."""
    parts = [(part[:, None] - table[None]).abs().sum(-1).argmin(-1) for part in rows.split(chunk)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _proposals(model: nn.Module, rec: Recording) -> Proposals | None:
    """The chosen encoder proposals (two-stage / mixed), located among the encoder tokens."""
    kind = model.transformer.queries.kind
    if kind not in ("two_stage", "mixed") or rec.queries is None or rec.queries.enc is None:
        return None
    enc, levels = rec.queries.enc, rec.levels
    chosen = rec.queries.reference[0]  # [Q, 4] the decoder's initial references
    if kind == "two_stage":  # enc holds every token: find the chosen ones among them
        token = _nearest(chosen, enc.boxes[0])
        anchors, scores = enc.anchors[0][token], enc.logits[0][token, 0]
    else:  # enc holds the chosen ones: find their anchors on the token grid
        grid = encoder_proposals(levels.padding[:1], levels.spatial_shapes)[0][0].sigmoid()
        anchors, scores = enc.anchors[0], enc.logits[0].max(-1).values
        token = _nearest(anchors, grid)
    starts = torch.tensor([0] + [h * w for h, w in levels.spatial_shapes]).cumsum(0)[:-1]
    level = torch.bucketize(token.cpu(), starts, right=True) - 1
    return Proposals(
        kind=kind,
        boxes=chosen.detach(),
        anchors=anchors.detach(),
        scores=scores.detach(),
        token_index=token,
        level=level,
        num_tokens=int(levels.padding.shape[1]),
    )


def _not_applicable(model: nn.Module, result: Explanation) -> list[Skipped]:
    """The pictures that do not apply to ``model``, with the reason."""
    t = model.transformer
    skipped = []
    if not result.decoder_sampling:
        skipped.append(
            Skipped(
                "decoder_sampling",
                "the decoder's cross-attention is global "
                "(every query attends to every token); see cross_attention",
            )
        )
    if not result.cross_attention:
        skipped.append(
            Skipped(
                "cross_attention",
                "deformable cross-attention has no dense map "
                "(each query reads a few sampled points); see decoder_sampling",
            )
        )
    if len(t.encoder.layers) == 0:
        for kind in ("encoder_sampling", "encoder_attention"):
            skipped.append(Skipped(kind, "the model has no encoder layers"))  # type: ignore[arg-type]
    else:
        if not result.encoder_sampling:
            skipped.append(
                Skipped(
                    "encoder_sampling",
                    "the encoder's self-attention is global "
                    "(no sampling points); see encoder_attention",
                )
            )
        if not result.encoder_attention:
            skipped.append(
                Skipped(
                    "encoder_attention",
                    "deformable self-attention has no dense map; see encoder_sampling",
                )
            )
    if result.proposals is None:
        skipped.append(
            Skipped(
                "proposals",
                f"the queries are '{t.queries.kind}', not chosen "
                "from encoder proposals (two_stage / mixed query selection)",
            )
        )
    if t.denoising is None:
        for kind in ("denoising_groups", "denoising_mask"):
            skipped.append(
                Skipped(
                    kind,
                    "the model has no denoising branch "  # type: ignore[arg-type]
                    "(model.denoising.kind: none)",
                )
            )
    return skipped


def _add_denoising(
    result: Explanation, model: nn.Module, batch: ImageBatch, targets: Target | None, seed: int
) -> None:
    """Draw denoising queries from ``targets`` (or the top predictions) and run a pass with
    them; fills ``result.denoising`` or says why it does not apply."""
    branch = model.transformer.denoising
    if branch is None:
        return
    device = batch.images.device
    source = "given" if targets is not None else "predictions"
    if targets is None:
        best = result.top_queries
        targets = Target(result.output.boxes[0, best], result.labels.clone())
    targets = targets.to(device)
    if len(targets) == 0:
        for kind in ("denoising_groups", "denoising_mask"):
            result.skipped.append(Skipped(kind, "no ground-truth box to noise"))  # type: ignore[arg-type]
        return
    generator = torch.Generator(device=device).manual_seed(seed)
    groups = build_denoising_groups(
        [targets],
        branch.kind,
        branch.dn_number,
        branch.label_noise_ratio,
        branch.box_noise_scale,
        branch.num_classes,
        generator,
    )
    content, boxes_unact = embed_denoising_queries(
        groups, branch.label_enc, 1, branch.indicator, branch.eps
    )
    meta = groups.meta
    num_matching = model.transformer.queries.num_matching
    mask = denoising_attention_mask(meta.pad_size, meta.group_size, num_matching, device)
    dn = DenoisingQueries(content, boxes_unact, mask, meta)

    def inject(module, args, kwargs):
        return args, {**kwargs, "dn_queries": dn}

    handle = model.transformer.register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with Collector(model) as rec:
            model(batch.images, batch.mask)
    finally:
        handle.remove()
    per_group = max(meta.group_size // (2 if meta.kind == "cdn" else 1), 1)
    result.denoising = DenoisingView(
        source=source,  # type: ignore[arg-type]
        gt_boxes=targets.boxes.float(),
        gt_labels=targets.labels,
        noised_boxes=groups.boxes,
        noised_labels=groups.labels,
        slot_index=groups.slot_index,
        target_index=groups.slot_index % per_group,
        group=groups.slot_index // max(meta.group_size, 1),
        negative=(groups.slot_index % max(meta.group_size, 1)) >= per_group,
        attn_mask=rec.attn_mask,
        reconstructed=rec.dn.layers[-1].boxes[0],
        meta=meta,
    )
