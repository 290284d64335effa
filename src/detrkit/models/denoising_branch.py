"""The learned part of denoising (DN-DETR, DINO): the label embedding, and the denoising
queries of a training batch (:mod:`detrkit.models.denoising` builds them)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from detrkit.models.denoising import DenoisingKind, DenoisingQueries, prepare_denoising
from detrkit.structures import Target

__all__ = ["DenoisingBranch"]


class DenoisingBranch(nn.Module):
    """The learned part of denoising: the label embedding, and how queries are drawn.

    Args:
        kind: ``dn`` or ``cdn``. num_classes: real classes ``C`` (noised labels are drawn
            from them). labelbook_size: rows of the label embedding minus one (``None``: ``C``);
            the last row is the "unknown" label. content_dim: embedding width (``d - 1`` with
            the indicator, else ``d``). dn_number / label_noise_ratio / box_noise_scale: see
            :func:`build_denoising_groups`. indicator: append the 0/1 denoising indicator.
        eps: inverse-sigmoid clamp of the noised boxes.

    State dict: ``label_enc`` ``[labelbook + 1, content_dim]``.
    """

    def __init__(
        self,
        kind: DenoisingKind,
        num_classes: int,
        labelbook_size: int | None,
        content_dim: int,
        dn_number: int,
        label_noise_ratio: float,
        box_noise_scale: float,
        indicator: bool,
        eps: float,
    ) -> None:
        super().__init__()
        book = num_classes if labelbook_size is None else labelbook_size
        if book < num_classes:
            raise ValueError(f"model.denoising.labelbook_size: {book} < num_classes {num_classes}")
        self.kind, self.num_classes, self.indicator, self.eps = kind, num_classes, indicator, eps
        self.dn_number, self.label_noise_ratio = dn_number, label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_enc = nn.Embedding(book + 1, content_dim)

    def unknown_label(self) -> Tensor:
        """``[content_dim]`` the embedding of the "unknown" label (the last row)."""
        return self.label_enc.weight[-1]

    def forward(self, targets: Sequence[Target], num_matching: int) -> DenoisingQueries:
        """Draw the denoising queries of ``targets`` (global random generator) for
        ``num_matching`` matching queries: content ``[B, P, d]``, boxes ``[B, P, 4]`` (unact),
        mask ``[P + Q', P + Q']``."""
        return prepare_denoising(
            targets,
            self.label_enc,
            num_matching,
            self.kind,
            self.dn_number,
            self.label_noise_ratio,
            self.box_noise_scale,
            self.num_classes,
            indicator=self.indicator,
            eps=self.eps,
        )

    def keep_in_graph(self, hidden: Tensor) -> Tensor:
        """``hidden`` plus a zero that depends on the label embedding, so that it takes part in
        every backward pass (distributed training needs every parameter used each step)."""
        return hidden + 0.0 * self.label_enc.weight[0, 0]
