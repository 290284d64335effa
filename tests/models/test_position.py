import math

import pytest
import torch

from detrkit.config import PositionConfig
from detrkit.models.detector import build_position_encoding
from detrkit.models.position import LearnedPositionEncoding, SinePositionEncoding


def _padded(h, w, ph, pw):
    mask = torch.ones(1, ph, pw, dtype=torch.bool)
    mask[:, :h, :w] = False
    return mask


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_sine_normalisation_ignores_padding(offset):
    enc = SinePositionEncoding(16, offset=offset)
    alone = enc(torch.zeros(1, 5, 7, dtype=torch.bool))
    padded = enc(_padded(5, 7, 9, 12))
    assert alone.shape == (1, 32, 5, 7) and padded.shape == (1, 32, 9, 12)
    torch.testing.assert_close(padded[..., :5, :7], alone, atol=1e-6, rtol=0)


def test_sine_values():
    enc = SinePositionEncoding(4, temperature_h=10000.0, temperature_w=10000.0)
    pos = enc(_padded(4, 3, 6, 6))
    # channel 0 = sin(y_norm), y_norm of the last valid row = 2*pi*4/(4+eps)
    y_last = 4 / (4 + 1e-6) * 2 * math.pi
    assert pos[0, 0, 3, 0].item() == pytest.approx(math.sin(y_last), abs=1e-5)
    # channel 1 = cos(y / T^(2*0/4)) (pairs share a frequency)
    y0 = 1 / (4 + 1e-6) * 2 * math.pi
    assert pos[0, 1, 0, 0].item() == pytest.approx(math.cos(y0), abs=1e-6)
    # x half starts at channel 2F: sin(x_norm); third frequency uses T^(2*1/4) = 100
    x1 = 2 / (3 + 1e-6) * 2 * math.pi
    assert pos[0, 4, 0, 1].item() == pytest.approx(math.sin(x1), abs=1e-6)
    assert pos[0, 6, 0, 1].item() == pytest.approx(math.sin(x1 / 100), abs=1e-6)


def test_offset_and_separate_temperatures():
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    base = SinePositionEncoding(8)(mask)
    shifted = SinePositionEncoding(8, offset=0.5)(mask)
    assert not torch.allclose(base, shifted)
    hw = SinePositionEncoding(8, temperature_h=20, temperature_w=10000)(mask)
    torch.testing.assert_close(hw[:, 8:], base[:, 8:])  # x half unchanged
    assert not torch.allclose(hw[:, :8], base[:, :8])


def test_sine_is_float32_for_float64_features():
    pos = SinePositionEncoding(8)(torch.zeros(2, 3, 3, dtype=torch.bool))
    assert pos.dtype == torch.float32


def test_learned_layout_and_padding():
    enc = LearnedPositionEncoding(6)
    pos = enc(_padded(3, 4, 5, 6))
    assert pos.shape == (1, 12, 5, 6)
    torch.testing.assert_close(pos[0, :6, 2, 3], enc.col_embed.weight[3])  # x first
    torch.testing.assert_close(pos[0, 6:, 2, 3], enc.row_embed.weight[2])
    alone = enc(torch.zeros(1, 3, 4, dtype=torch.bool))
    torch.testing.assert_close(pos[..., :3, :4], alone)
    assert set(enc.state_dict()) == {"row_embed.weight", "col_embed.weight"}
    with pytest.raises(ValueError, match="up to 50x50"):
        enc(torch.zeros(1, 51, 3, dtype=torch.bool))


def test_build_from_config():
    assert isinstance(
        build_position_encoding(PositionConfig(kind="learned"), 64), LearnedPositionEncoding
    )
    enc = build_position_encoding(PositionConfig(offset=0.5, temperature_h=20.0), 64)
    assert isinstance(enc, SinePositionEncoding)
    assert (enc.num_pos_feats, enc.offset, enc.temperature_h) == (32, 0.5, 20.0)
