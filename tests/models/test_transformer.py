import torch

from detrkit.models.decoder import GlobalDecoder, GlobalDecoderLayer
from detrkit.models.encoder import GlobalEncoder, GlobalEncoderLayer
from detrkit.models.position import SinePositionEncoding
from detrkit.models.transformer import DETRTransformer


def _tiny(**kw):
    args = dict(hidden_dim=32, nheads=4, enc_layers=2, dec_layers=3, dim_feedforward=64,
                dropout=0.0, num_queries=5, num_logits=4)
    args.update(kw)
    return DETRTransformer(**args).eval()


def test_encoder_final_norm_only_with_pre_norm():
    post = GlobalEncoder(GlobalEncoderLayer(16, 2, pre_norm=False), 2, 16)
    pre = GlobalEncoder(GlobalEncoderLayer(16, 2, pre_norm=True), 2, 16)
    assert post.norm is None and isinstance(pre.norm, torch.nn.LayerNorm)
    dec = GlobalDecoder(GlobalDecoderLayer(16, 2, pre_norm=False), 2, 16)
    assert isinstance(dec.norm, torch.nn.LayerNorm)


def test_decoder_returns_every_layer_normed():
    torch.manual_seed(0)
    dec = GlobalDecoder(GlobalDecoderLayer(16, 2, dim_feedforward=32, dropout=0.0), 3, 16).eval()
    with torch.no_grad():
        dec.norm.weight.uniform_(0.5, 2.0)
    tgt, query_pos = torch.zeros(2, 4, 16), torch.randn(2, 4, 16)
    memory, pos = torch.randn(2, 6, 16), torch.randn(2, 6, 16)
    hs = dec(tgt, memory, query_pos, pos, None)
    assert hs.shape == (3, 2, 4, 16)
    x = tgt
    for i, layer in enumerate(dec.layers):
        x = layer(x, memory, query_pos, pos, None)
        torch.testing.assert_close(hs[i], dec.norm(x))


def test_outputs_and_aux_shapes():
    model = _tiny()
    src = torch.randn(2, 32, 3, 4)
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    pos = SinePositionEncoding(16)(mask)
    out = model([src], [mask], [pos])
    assert out.logits.shape == (2, 5, 4) and out.boxes.shape == (2, 5, 4)
    assert len(out.aux) == 2 and all(a.logits.shape == (2, 5, 4) for a in out.aux)
    assert ((out.boxes > 0) & (out.boxes < 1)).all()
    assert out.enc is None and out.dn is None


def test_masked_tokens_do_not_leak():
    """Garbage in padded feature positions changes nothing (pre- and post-norm)."""
    for pre_norm in (False, True):
        torch.manual_seed(0)
        model = _tiny(pre_norm=pre_norm)
        enc = SinePositionEncoding(16)
        src = torch.randn(1, 32, 3, 4)
        mask = torch.zeros(1, 3, 4, dtype=torch.bool)
        big = torch.randn(1, 32, 5, 7) * 10
        big[..., :3, :4] = src
        big_mask = torch.ones(1, 5, 7, dtype=torch.bool)
        big_mask[..., :3, :4] = False
        with torch.no_grad():
            a = model([src], [mask], [enc(mask)])
            b = model([big], [big_mask], [enc(big_mask)])
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.boxes, b.boxes, atol=1e-5, rtol=0)


def test_sigmoid_head_starts_at_prior():
    model = _tiny(num_logits=3, sigmoid=True)
    torch.testing.assert_close(model.class_embed.bias.sigmoid(), torch.full((3,), 0.01))
