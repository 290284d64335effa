import pytest
import torch

from detrkit.data.collate import collate, images_to_batch
from detrkit.structures import Target


def test_collate_pads_top_left_and_masks_padding_exactly():
    a = torch.rand(3, 4, 7) + 1.0  # strictly positive, so zeros can only be padding
    b = torch.rand(3, 6, 5) + 1.0
    targets = [
        Target(torch.rand(2, 4), torch.tensor([0, 1]), 1, (4, 7), (40, 70)),
        Target(torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), 2, (6, 5), (60, 50)),
    ]
    batch, out_targets = collate([(a, targets[0]), (b, targets[1])])
    assert batch.images.shape == (2, 3, 6, 7) and batch.mask.shape == (2, 6, 7)
    assert batch.mask.dtype == torch.bool
    torch.testing.assert_close(batch.images[0, :, :4, :7], a)
    torch.testing.assert_close(batch.images[1, :, :6, :5], b)
    assert torch.equal(batch.mask, (batch.images == 0).all(dim=1))  # True exactly on padding
    assert batch.mask[0, 4:].all() and not batch.mask[0, :4].any()
    assert batch.mask[1, :, 5:].all() and not batch.mask[1, :, :5].any()
    assert batch.sizes.tolist() == [[4, 7], [6, 5]] and batch.sizes.dtype == torch.int64
    assert batch.orig_sizes.tolist() == [[40, 70], [60, 50]]
    assert out_targets == targets


def test_images_to_batch_defaults_and_errors():
    batch = images_to_batch([torch.ones(3, 2, 3, dtype=torch.float64)])
    assert batch.images.dtype == torch.float64 and not batch.mask.any()
    assert batch.orig_sizes.tolist() == [[2, 3]] and len(batch) == 1
    batch = images_to_batch(
        [torch.ones(3, 2, 3), torch.ones(3, 3, 2)], orig_sizes=[(20, 30), (30, 20)]
    )
    assert batch.orig_sizes.tolist() == [[20, 30], [30, 20]] and int(batch.mask.sum()) == 6
    with pytest.raises(ValueError, match="expected \\[3, H, W\\]"):
        images_to_batch([torch.ones(1, 2, 3)])
    with pytest.raises(ValueError, match="no images"):
        images_to_batch([])
