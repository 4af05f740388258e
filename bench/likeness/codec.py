"""The mini model's VAE: an exact, hand-set 8x8 box codec written as ComfyUI TAESD weights.

Why not the tiny checkpoint's VAE: it has random weights, so it is no autoencoder (measured by the runner:
``codec_check`` in the JSON). Training a VAE would cost minutes and blur the very colour statistics this
benchmark measures. Instead the latent of a cell is a fixed linear map of its mean colour,

    z = K * A @ (rgb - 0.5)        (z in the model's sampling space, 4 channels; A: 4x3, orthonormal columns)

and decoding is its exact inverse, ``rgb = 0.5 + A.T @ z / K``, painted over the cell's 8x8 pixels. Both are
written into ComfyUI's TAESD layout (``taesd_encoder.*``, ``taesd_decoder.*``, ``vae_scale``, ``vae_shift``),
which ``comfy.sd.VAE`` recognises inside a checkpoint, so VAEEncode/VAEDecode and the reference encoder use it
like any VAE: the encoder's strided convolutions average 2x2 three times (an 8x8 box), every residual block is
an identity (its last convolution is zero, inputs stay >= 0 through the ReLUs), the decoder upsamples nearest.
The decoder's only non-linearity, TAESD's ``tanh(x / 3) * 3`` clamp, sees |x| <= ~0.04 (``vae_scale``), where it
is linear to ~1e-4.

Why K = 5 and not unit variance: a briefly trained eps model predicts the noise with an error of a few percent at
every sigma, and each Euler step adds (sigma - sigma_next) times that error to the sample, white across cells; at
K = 2.5 (std ~0.85) that residue decoded to saturated speckle over every sample. Decoding divides it by K, and
the larger signal also raises every step's signal-to-noise ratio, so the layout is legible earlier in sampling.
"""
from __future__ import annotations

import torch
from torch import Tensor

SD15_SCALE = 0.18215  # comfy.latent_formats.SD15().scale_factor: raw VAE latent * this = sampling space
K = 5.0  # spreads the cells' colours to a standard deviation of ~1.7 in the sampling space (see below)
CLAMP_SCALE = 0.01  # the decoder's clamp sees z * CLAMP_SCALE
WIDTH = 64  # TAESD's channel width
# Three Hadamard columns / 2: orthonormal, every latent channel mixes all three colours.
A = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]]) / 2.0


def encode_cells(cells: Tensor) -> Tensor:
    """[B, 3, h, w] cell colours -> [B, 4, h, w] latents in the model's sampling space."""
    return K * torch.einsum("lc,bchw->blhw", A, cells - 0.5)


def decode_cells(latents: Tensor) -> Tensor:
    """[B, 4, h, w] sampling-space latents -> [B, 3, h, w] cell colours (least squares: A has orthonormal
    columns, so the component along A's null space, which no image has, is ignored)."""
    return 0.5 + torch.einsum("lc,blhw->bchw", A, latents.float()) / K


def _centre(weight: Tensor, rows: Tensor) -> None:
    """Put ``rows`` ([out, in]) at the centre tap of a 3x3 kernel ``weight`` [out', in', 3, 3]."""
    weight[: rows.shape[0], : rows.shape[1], 1, 1] = rows


def taesd_state_dict() -> dict[str, Tensor]:
    """The codec as ComfyUI TAESD weights (keys without the checkpoint's ``first_stage_model.`` prefix)."""
    from comfy.taesd.taesd import TAESD

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in TAESD().state_dict().items()}
    sd = {k: torch.zeros(s) for k, s in shapes.items()}
    eye = torch.eye(3)
    enc, dec = "taesd_encoder", "taesd_decoder"
    # encoder: 0 conv(3->64) copies RGB, 2/6/10 stride-2 convs average 2x2 (taps at offsets 0 and +1), 14 maps.
    _centre(sd[f"{enc}.0.weight"], eye)
    for i in (2, 6, 10):
        w = sd[f"{enc}.{i}.weight"]
        for c in range(3):
            w[c, c, 1:, 1:] = 0.25
    scale = CLAMP_SCALE * K
    _centre(sd[f"{enc}.14.weight"], scale * A)
    sd[f"{enc}.14.bias"][:4] = -scale * A.sum(dim=1) * 0.5
    # decoder: 1 conv(4->64) inverts the map and adds 1 (so the ReLUs pass it), upsample convs copy, 18 removes 1
    _centre(sd[f"{dec}.1.weight"], A.T / scale)
    sd[f"{dec}.1.bias"][:3] = 1.5
    for i in (7, 12, 17):
        _centre(sd[f"{dec}.{i}.weight"], torch.eye(WIDTH))
    _centre(sd[f"{dec}.19.weight"], eye)
    sd[f"{dec}.19.bias"][:] = -1.0
    # residual blocks: every convolution zero (their output then is the ReLU of the skip, an identity here)
    sd["vae_scale"] = torch.tensor(SD15_SCALE * CLAMP_SCALE)
    sd["vae_shift"] = torch.tensor(0.0)
    return sd
