"""The papers' released code paths, transcribed once: what the tests check our ops against (the official
code's semantics) and what the benchmarks time as "released".

Written from the released code's behaviour, in our own code:

* OGM-GE (Peng et al., CVPR 2022, GeWu-Lab/OGM-GE_CVPR2022, ``main.py`` ``train_epoch``): the per-modality
  score is a Python ``sum`` over the batch of ``softmax(out)[i][label[i]]`` with the softmax of the whole
  batch evaluated inside the comprehension (once per sample); the two-modality ratio rule of the paper's
  Eq. 10 with its ``if ratio_v > 1`` branch decided on the host; the GE modulation, which for every
  parameter with a 4-D gradient of the matching encoder replaces the gradient by
  ``grad * coeff + N(0, grad.std() + 1e-8)`` (the std read back with ``.item()``, one host sync each).
* MWAM (a6103121/MWAM, ``src/freq_n.py`` ``FrequencyLayer`` and the ``SURF_MMANet`` forward): patches as a
  permuted view ``(b, nph, npw, c, p, p)``, ``torch_dct.dct_2d(patches, 'ortho')``, boolean masks selecting
  the top-left and bottom-right ``q×q`` blocks, the high block flipped on both axes, then
  ``(low / (high + 1e-6)).abs().sum()`` — one scalar per modality, summed over the batch. The released view
  relabels the masked values as ``(b, c, nph, npw, q, q)`` although they are stored ``(b, nph, npw, c, q, q)``;
  low and high are relabelled alike and the metric is a full sum, so the value is unaffected. ``torch_dct``
  is a separate package; :func:`dct_2d_fft` is the same FFT algorithm (Makhoul's even/odd reordering, one
  complex FFT, a twiddle, ortho scaling, once per axis) for machines without it.

These are slow on purpose (they are what the released code does); never call them on a hot path.
"""
from __future__ import annotations

import math

import torch
from torch.nn import functional as F

GE_STD_EPS = 1e-8  # added to the gradient std in the released GE noise
MWAM_EPS = 1e-6    # added to the high-frequency coefficient in the released FRM ratio


# ------------------------------------------------------------------------------------------------ OGM-GE
def ogm_ge_score(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Released score of one modality: Σ_i softmax(out)[i][label[i]], the batch softmax recomputed per i."""
    total = 0
    for i in range(out.size(0)):
        total = total + F.softmax(out, dim=1)[i][label[i]]
    return total


def ogm_ge_coefficients(score_a, score_v, alpha: float):
    """Released two-modality rule (Eq. 10): ρ_v = s_v / s_a; the stronger modality gets 1 − tanh(α·relu(ρ)),
    the other 1. The branch is a Python ``if`` on a tensor (a host sync), and a tie takes the ``else``
    branch (audio modulated by 1 − tanh(α)). Returns ``(coeff_a, coeff_v)``; the modulated one is a tensor
    when the scores are tensors, the other the int 1, as released."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1, 1 - torch.tanh(alpha * torch.relu(torch.as_tensor(ratio_v)))
    return 1 - torch.tanh(alpha * torch.relu(torch.as_tensor(ratio_a))), 1


def ge_modulate_(params, coeff) -> None:
    """Released OGM-GE modulation of one encoder's parameters: each 4-D gradient becomes
    ``grad * coeff + N(0, std(grad) + 1e-8)`` (a new tensor assigned to ``.grad``; the std read with ``.item()``)."""
    for p in params:
        if p.grad is not None and p.grad.dim() == 4:
            p.grad = p.grad * coeff + torch.zeros_like(p.grad).normal_(0, p.grad.std().item() + GE_STD_EPS)


def ogm_modulate_(params, coeff) -> None:
    """Released OGM (no GE): each 4-D gradient scaled in place by ``coeff``."""
    for p in params:
        if p.grad is not None and p.grad.dim() == 4:
            p.grad *= coeff


def concat_head_logits(weight: torch.Tensor, bias: torch.Tensor, feat_a: torch.Tensor, feat_v: torch.Tensor):
    """Released unimodal logits of a concat-fusion head (audio features first): each modality's half of the
    weight, plus half the bias. Returns ``(out_a, out_v)``."""
    half = weight.size(1) // 2
    out_v = torch.mm(feat_v, weight[:, half:].t()) + bias / 2
    out_a = torch.mm(feat_a, weight[:, :half].t()) + bias / 2
    return out_a, out_v


def ogm_ge_step_modulation(audio_params, visual_params, weight, bias, feat_a, feat_v, label, alpha: float,
                           ge: bool = True):
    """Everything the released training step adds after ``loss.backward()``: head-split logits, the score
    loop per modality, the host-side ratio rule, and the per-parameter modulation of both encoders.
    Returns ``(coeff_a, coeff_v)``."""
    out_a, out_v = concat_head_logits(weight, bias, feat_a, feat_v)
    score_v = ogm_ge_score(out_v, label)
    score_a = ogm_ge_score(out_a, label)
    coeff_a, coeff_v = ogm_ge_coefficients(score_a, score_v, alpha)
    modulate = ge_modulate_ if ge else ogm_modulate_
    modulate(audio_params, coeff_a)
    modulate(visual_params, coeff_v)
    return coeff_a, coeff_v


# ------------------------------------------------------------------------------------------------ MWAM
def _dct_fft_last(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis through one length-N complex FFT (Makhoul's reordering)."""
    n = x.shape[-1]
    rows = x.contiguous().view(-1, n)
    v = torch.cat([rows[:, 0::2], rows[:, 1::2].flip([1])], dim=1)
    spec = torch.view_as_real(torch.fft.fft(v, dim=1))
    theta = torch.arange(n, dtype=x.dtype, device=x.device) * (math.pi / (2 * n))
    out = 2 * (spec[:, :, 0] * torch.cos(theta) + spec[:, :, 1] * torch.sin(theta))
    out[:, 0] = out[:, 0] / (2 * math.sqrt(n))
    out[:, 1:] = out[:, 1:] / (2 * math.sqrt(n / 2))
    return out.view(x.shape)


def dct_2d_fft(x: torch.Tensor, norm: str = "ortho") -> torch.Tensor:
    """Orthonormal 2-D DCT-II of the last two axes, the FFT algorithm ``torch_dct.dct_2d`` uses."""
    if norm != "ortho":
        raise ValueError(f"dct_2d_fft: norm must be 'ortho' (the only form the released MWAM code uses), got {norm!r}")
    return _dct_fft_last(_dct_fft_last(x).transpose(-1, -2)).transpose(-1, -2)


def released_dct_2d():
    """``(dct_2d, description)``: ``torch_dct.dct_2d`` when the ``torch-dct`` package is installed (what the
    released code calls), else :func:`dct_2d_fft`."""
    try:
        import torch_dct

        return torch_dct.dct_2d, "torch_dct.dct_2d (torch-dct package)"
    except ImportError:
        return dct_2d_fft, "dct_2d_fft: torch-dct's FFT algorithm transcribed (torch-dct not installed)"


def mwam_frequency_layer(x: torch.Tensor, patch_size: int = 8, window: int = 2, dct_2d=None):
    """Released ``FrequencyLayer.forward``: ``(low, high)`` blocks of every patch's DCT, high flipped."""
    dct_2d = dct_2d or dct_2d_fft
    b, c, h, w = x.shape
    p, q = patch_size, window
    nph, npw = h // p, w // p
    y = dct_2d(x.view(b, c, nph, p, npw, p).permute(0, 2, 4, 1, 3, 5), "ortho")
    low_mask = torch.zeros_like(y, dtype=torch.bool)
    low_mask[..., :q, :q] = True
    high_mask = torch.zeros_like(y, dtype=torch.bool)
    high_mask[..., p - q:, p - q:] = True
    low = y[low_mask].view(b, c, nph, npw, q, q).permute(0, 2, 3, 1, 4, 5)
    high = y[high_mask].view(b, c, nph, npw, q, q).flip(4).flip(5).permute(0, 2, 3, 1, 4, 5)
    return low, high


def mwam_frm(x: torch.Tensor, patch_size: int = 8, window: int = 2, dct_2d=None) -> torch.Tensor:
    """Released MWAM metric of one modality: ``(low / (high + 1e-6)).abs().sum()`` (a scalar over the batch)."""
    low, high = mwam_frequency_layer(x, patch_size, window, dct_2d)
    return (low / (high + MWAM_EPS)).abs().sum()
