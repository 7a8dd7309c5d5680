"""frm side by side: (a) the released MWAM code path, (b) eager ``frm_ref``, (c) ``torch.compile(frm_ref)``,
(d) ``mmkernels.frm``.

(a) follows the released ``FrequencyLayer`` + ``(low / (high + 1e-6)).abs().sum()``: patches as a permuted
view, a full orthonormal 2-D DCT of every patch computed with FFTs the way the ``torch-dct`` package does
it (even/odd reordering, a complex FFT, a twiddle factor, ortho scaling, once per axis), boolean masks
for the low and high blocks, the high block flipped, then the ratio. ``torch_dct.dct_2d`` is used when the
``torch-dct`` package is installed (``pip install torch-dct``, a benchmark-only dependency); otherwise
:func:`dct_2d_fft` below, our own transcription of the same FFT algorithm. The row says which.

On the CPU, backend ``auto`` runs the reference, so (d) is (b) plus the custom-op dispatch there.
"""
from __future__ import annotations

import math

import torch

from mmkernels.bench.harness import measure


def _dct_fft_last(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II along the last axis through one length-N complex FFT (Makhoul's reordering)."""
    n = x.shape[-1]
    flat = x.contiguous().view(-1, n)
    v = torch.cat([flat[:, 0::2], flat[:, 1::2].flip([1])], dim=1)
    spec = torch.view_as_real(torch.fft.fft(v, dim=1))
    theta = torch.arange(n, dtype=x.dtype, device=x.device) * (math.pi / (2 * n))
    out = 2 * (spec[:, :, 0] * torch.cos(theta) + spec[:, :, 1] * torch.sin(theta))
    out[:, 0] = out[:, 0] / (2 * math.sqrt(n))
    out[:, 1:] = out[:, 1:] / (2 * math.sqrt(n / 2))
    return out.view(x.shape)


def dct_2d_fft(x: torch.Tensor, norm: str = "ortho") -> torch.Tensor:
    assert norm == "ortho"
    return _dct_fft_last(_dct_fft_last(x).transpose(-1, -2)).transpose(-1, -2)


def released_frm(x: torch.Tensor, patch_size: int = 8, window: int = 2, eps: float = 1e-6, dct_2d=None) -> torch.Tensor:
    """The released MWAM metric of one modality (a scalar: summed over the batch, as the released code does)."""
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
    return (low / (high + eps)).abs().sum()


def _released_impl():
    try:
        import torch_dct

        return torch_dct.dct_2d, "torch_dct.dct_2d (torch-dct package)"
    except ImportError:
        return dct_2d_fft, "own transcription of torch-dct's FFT DCT (torch-dct not installed)"


def make_impls(x: torch.Tensor) -> tuple[dict, str]:
    import mmkernels
    from mmkernels.ops.frm import frm_ref

    dct_2d, which = _released_impl()
    compiled = torch.compile(lambda t: frm_ref(t, reduction="sum"))
    impls = {
        "released_mwam": lambda: released_frm(x, dct_2d=dct_2d),
        "frm_ref_eager": lambda: frm_ref(x, reduction="sum"),
        "frm_ref_compiled": lambda: compiled(x),
        "mmkernels.frm": lambda: mmkernels.frm(x, reduction="sum"),
    }
    return impls, which


def run(device: str, quick: bool) -> list[dict]:
    import mmkernels

    shapes = [(8, 3, 32, 32)] if quick else [(64, 3, 112, 112)]
    if device == "cuda" and not quick:
        shapes.append((256, 3, 448, 448))  # 616 MB of fp32: the bandwidth-bound regime
    rows = []
    for shape in shapes:
        x = torch.rand(shape, device=device)
        impls, which = make_impls(x)
        extra = {"dtype": "float32", "released_dct": which, "backend": mmkernels.get_backend(),
                 "frm_path": "triton" if device == "cuda" and mmkernels.get_backend() != "reference" else "reference"}
        rows += measure("frm", "x".join(map(str, shape)), impls, device, baseline="released_mwam",
                        nbytes=x.numel() * x.element_size(), quick=quick, extra=extra)
        del x, impls
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows
