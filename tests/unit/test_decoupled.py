"""Decoupled image cross-attention against a naive float64 implementation of the official processor."""
import pytest
import torch
import torch.nn.functional as F
from naive import naive_attention

from humanref.attention.decoupled import (
    MAX_IMAGE_TOKENS,
    decoupled_cross_attention,
    pad_image_tokens,
    project_image_tokens,
)


def default_attn(q, k, v, heads):
    """The host's attention (SDPA here), as the ComfyUI side passes optimized_attention."""
    b, n, c = q.shape
    q, k, v = (t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)


def official(q, k_text, v_text, image_tokens, wk, wv, heads):
    """The official processor: text attention + 1.0 * attention over to_k_dc/to_v_dc of the 6 image tokens."""
    k_img = image_tokens.double() @ wk.double().t()
    v_img = image_tokens.double() @ wv.double().t()
    return naive_attention(q, k_text, v_text, heads) + naive_attention(q, k_img, v_img, heads)


@pytest.mark.parametrize("refs", [1, 3, 6])
def test_matches_official_for_cond_and_uncond(refs):
    g = torch.Generator().manual_seed(refs)
    heads, c, d_img, n = 4, 32, 24, 10
    q = torch.randn(4, n, c, generator=g)  # chunks [uncond, cond], 2 images each
    k_text, v_text = torch.randn(4, 7, c, generator=g), torch.randn(4, 7, c, generator=g)
    wk, wv = torch.randn(c, d_img, generator=g) / 5, torch.randn(c, d_img, generator=g) / 5
    embeds = torch.randn(refs, d_img, generator=g)
    tokens = pad_image_tokens(embeds)
    assert tokens.shape == (MAX_IMAGE_TOKENS, d_img) and not tokens[refs:].any()
    text = default_attn(q, k_text, v_text, heads)
    out = decoupled_cross_attention(q, text, project_image_tokens(tokens, wk, wv), heads, [1, 0], default_attn)
    cond_tokens = tokens.unsqueeze(0).expand(2, -1, -1)
    expect_c = official(q[2:], k_text[2:], v_text[2:], cond_tokens, wk, wv, heads)
    expect_u = official(q[:2], k_text[:2], v_text[:2], torch.zeros_like(cond_tokens), wk, wv, heads)
    assert torch.allclose(out[2:].double(), expect_c, atol=1e-5)
    assert torch.allclose(out[:2].double(), expect_u, atol=1e-5)
    # zero padding dilutes: dropping the padding tokens would change the cond result
    if refs < MAX_IMAGE_TOKENS:
        undiluted = official(q[2:], k_text[2:], v_text[2:], embeds.unsqueeze(0).expand(2, -1, -1), wk, wv, heads)
        assert (undiluted - expect_c).abs().max() > 1e-3


def test_chunk_order_follows_cond_or_uncond():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, 16, generator=g)
    text = torch.randn(3, 5, 16, generator=g)
    tok = project_image_tokens(pad_image_tokens(torch.randn(2, 8, generator=g)), torch.randn(16, 8, generator=g),
                               torch.randn(16, 8, generator=g))
    out = decoupled_cross_attention(q, text, tok, 2, [0, 1, 0], default_attn)
    assert torch.equal(out[1], text[1])  # uncond untouched
    assert not torch.allclose(out[0], text[0]) and not torch.allclose(out[2], text[2])
    assert torch.equal(decoupled_cross_attention(q, text, tok, 2, [1, 1, 1], default_attn), text)
    with pytest.raises(ValueError, match="cannot be split into 2 CFG chunks"):
        decoupled_cross_attention(q, text, tok, 2, [1, 0], default_attn)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at most 6"):
        pad_image_tokens(torch.zeros(7, 4))
    with pytest.raises(ValueError, match=r"\[references, dim\]"):
        pad_image_tokens(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="image tokens have dim 4"):
        project_image_tokens(torch.zeros(6, 4), torch.zeros(8, 5), torch.zeros(8, 5))
