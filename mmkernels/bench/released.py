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


# ------------------------------------------------------------------------------------------------ AGM
# AGM (Li et al., ICCV 2023). Two releases, transcribed for timing and for the semantic tests:
#
# * the authors' (lihong2303/AGM_ICCV2023, ``model/CREMAD_net.py`` ``GradMod`` and ``run/CREMAD_main.py``
#   ``train``): four forwards of the network, the full one in train mode and three in eval mode *with*
#   autograd (audio kept, visual kept, both zeroed; the last is computed and not used); mono-modal outputs
#   ``m_a = ½(total − pad_audio + pad_visual)`` and ``m_v`` alike, each through an identity module whose full
#   backward hook multiplies its gradient by the modality's coefficient; the loss is the CE of ``m_a + m_v``;
#   per-sample Python loop for the mono-modal CE (``p_y < 1e-8`` replaced by 1e-8), ``.item()`` reads,
#   ``ratio_a = exp(s_v − s_a)``, ``coeff = exp(α·min(r̄ − r, 10))``, cumulative-mean target updated after
#   the coefficient, coefficients set only inside ``starts <= epoch <= ends`` (outside, the hooks keep the
#   scale last set), then clipping of the whole model to norm 1 when the head's weight gradient leaves [-1, 1].
# * BalanceBenchmark's (GeWu-Lab/BalanceBenchmark, ``balancemm/trainer/AGM_trainer.py`` ``newGrad`` and
#   ``AGMTrainer.training_step``): every non-empty coalition of the other modalities and the same with the
#   modality added, each forward once (cached), in eval mode under no_grad with the missing inputs zeroed;
#   responses ``Σ w·(f(S ∪ m) − f(S))`` over non-empty S only; then the train-mode forward and its backward;
#   the same per-sample loop; ``ratio = exp(M/(M−1)·(s_m − mean))`` (sign opposite to the authors');
#   ``coeff = exp(α·min(r̄ − r, 7))``; every parameter whose name contains the modality's name and whose
#   gradient is not 1-D gets ``grad *= coeff``; no window test; clipping to norm 5 when the head's weight
#   gradient leaves [-5, 5].
def agm_mono_loss(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Released mono-modal CE: a per-sample loop, the batch softmax recomputed per sample, floor 1e-8."""
    total = 0.
    for k in range(out.size(0)):
        p = F.softmax(out, dim=1)[k][label[k]]
        if torch.isinf(torch.log(p)) or p < 1e-8:
            total = total - torch.log(torch.tensor(1e-8, dtype=out.dtype, device=out.device))
        else:
            total = total - torch.log(p)
    return total / out.size(0)


class _HookedIdentity(torch.nn.Module):
    """The authors' ``Modality_out``: identity whose full backward hook scales the gradient by ``scale``."""

    def __init__(self):
        super().__init__()
        self.scale = 1.0
        self.register_full_backward_hook(lambda m, gin, gout: (gin[0].clone() * self.scale,))

    def forward(self, x):
        return x


def agm_authors_state() -> dict:
    return {"score_a": 0.0, "score_v": 0.0, "hook_a": _HookedIdentity(), "hook_v": _HookedIdentity()}


def agm_authors_step(net, forward, opt, xa, xv, y, state: dict, iteration: int, epoch: int, alpha: float,
                     clamp: float | None = 10.0, window=(0, 20), head_weight=None, clip: float = 1.0):
    """One step of the authors' AGM (two modalities). ``forward(xa, xv) -> logits``; ``net`` is toggled
    between train and eval as released; ``iteration`` is 1-based. Returns the coefficients it computed."""
    opt.zero_grad()
    total = forward(xa, xv)
    net.eval()
    pad_visual = forward(xa, torch.zeros_like(xv))
    pad_audio = forward(torch.zeros_like(xa), xv)
    forward(torch.zeros_like(xa), torch.zeros_like(xv))  # computed by the release, never used
    net.train()
    m_a = state["hook_a"](0.5 * (total - pad_audio + pad_visual))
    m_v = state["hook_v"](0.5 * (total - pad_visual + pad_audio))
    loss = F.cross_entropy(m_a + m_v, y)
    s_a, s_v = agm_mono_loss(m_a, y), agm_mono_loss(m_v, y)
    ratio_a, ratio_v = math.exp(s_v.item() - s_a.item()), math.exp(s_a.item() - s_v.item())
    opt_a = math.exp(state["score_v"] - state["score_a"])
    opt_v = math.exp(state["score_a"] - state["score_v"])
    cap = (lambda d: d) if clamp is None else (lambda d: min(d, clamp))
    coeff_a, coeff_v = math.exp(alpha * cap(opt_a - ratio_a)), math.exp(alpha * cap(opt_v - ratio_v))
    state["score_a"] = state["score_a"] * (iteration - 1) / iteration + s_a.item() / iteration
    state["score_v"] = state["score_v"] * (iteration - 1) / iteration + s_v.item() / iteration
    if window[0] <= epoch <= window[1]:
        state["hook_a"].scale, state["hook_v"].scale = coeff_a, coeff_v
    loss.backward()
    if head_weight is not None and (head_weight.grad.max() > clip or head_weight.grad.min() < -clip):
        torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm=clip)
    opt.step()
    return coeff_a, coeff_v


def agm_benchmark_step(model, forward, opt, inputs: dict, y, scores: dict, iteration: int, alpha: float,
                       clamp: float = 7.0, head_weight=None, clip: float = 5.0):
    """One step of BalanceBenchmark's AGM. ``forward(inputs_dict) -> logits``; ``scores``: the running
    averages by modality name (updated in place); ``iteration`` is 1-based. Returns the coefficients."""
    from itertools import combinations

    names = list(inputs)
    M = len(names)
    res, cache = {}, {}

    def coalition(combo):
        key = tuple(sorted(combo))
        if key not in cache:
            cache[key] = forward({n: (x if n in combo else torch.zeros_like(x)) for n, x in inputs.items()})
        return cache[key]

    with torch.no_grad():
        model.eval()
        for m in names:
            others = [n for n in names if n != m]
            for r in range(1, len(others) + 1):
                for combo in combinations(others, r):
                    w = math.factorial(r) * math.factorial(M - r - 1) / math.factorial(M)
                    term = w * (coalition(list(combo) + [m]) - coalition(list(combo)))
                    res[m] = term if m not in res else res[m] + term
    model.train()
    out = forward(inputs)
    opt.zero_grad()
    F.cross_entropy(out, y).backward()
    s = {m: agm_mono_loss(res[m], y) for m in names}
    s_mean = sum(s.values()) / M
    t_mean = sum(scores.values()) / M
    coeffs = {}
    for m in names:
        ratio = math.exp(M / (M - 1) * (s[m].item() - s_mean.item()))
        optimal = math.exp(M / (M - 1) * (scores[m] - t_mean))
        coeffs[m] = math.exp(alpha * min(optimal - ratio, clamp))
        scores[m] = scores[m] * (iteration - 1) / iteration + s[m].item() / iteration
    for name, p in model.named_parameters():
        for m in names:
            if m in name and p.grad is not None and p.grad.dim() != 1:
                p.grad *= coeffs[m]
    if head_weight is not None and (head_weight.grad.max() > clip or head_weight.grad.min() < -clip):
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip)
    opt.step()
    return coeffs


# --------------------------------------------------------------------------------------------------------
# PMR (Fan et al., CVPR 2023, fanyunfeng-bit/Modal-Imbalance-PMR, main_Prototype_grad.py)
# --------------------------------------------------------------------------------------------------------
def pmr_eu_dist(x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """The released ``EU_dist``: a zero ``(B, C)`` matrix filled by a double Python loop, one
    ``sqrt(dot(x1[i] − x2[j], x1[i] − x2[j]))`` per entry (differentiable in both arguments)."""
    d = torch.zeros(x1.shape[0], x2.shape[0], device=x1.device, dtype=x1.dtype)
    for i in range(x1.shape[0]):
        for j in range(x2.shape[0]):
            diff = x1[i] - x2[j]
            d[i, j] = torch.sqrt(torch.dot(diff, diff))
    return d


def pmr_score(sim: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The released prototype score: a Python ``sum`` over the batch of ``softmax(sim)[i][label[i]]`` with the
    batch softmax evaluated inside the comprehension, once per sample."""
    return sum(torch.softmax(sim, dim=1)[i][label[i]] for i in range(sim.size(0)))


def pmr_step_loss(feat_a, feat_v, out, label, proto_a, proto_v, alpha: float, active: bool) -> torch.Tensor:
    """The loss of one released PMR training step (``modulation == 'Proto'``): negative Euclidean distances to
    the (constant) prototypes, the two scores and their ratio decided on the host, the prototypical
    cross-entropy on the weaker modality times ``alpha``. Logging-only work of the released step (head-split
    scores, unimodal losses, prints, ``.item()``) is left out."""
    audio_sim = -pmr_eu_dist(feat_a, proto_a)
    visual_sim = -pmr_eu_dist(feat_v, proto_v)
    loss = F.cross_entropy(out, label)
    if not active:
        return loss
    ratio_a_p = pmr_score(audio_sim, label) / pmr_score(visual_sim, label)
    loss_proto_a = F.cross_entropy(audio_sim, label)
    loss_proto_v = F.cross_entropy(visual_sim, label)
    if ratio_a_p > 1:  # a host sync, as released
        beta, lam = 0.0, alpha
    elif ratio_a_p < 1:
        beta, lam = alpha, 0.0
    else:
        beta, lam = 0.0, 0.0
    return loss + beta * loss_proto_a + lam * loss_proto_v


def pmr_calculate_prototype(feats: list, labels: list, n_classes: int, momentum: float = 0.0, old=None):
    """The released ``calculate_prototype`` on given (already computed, ``no_grad``) features: per-sample
    accumulation into per-class rows with a Python class counter, division per class, then
    ``(1 − momentum)·mean + momentum·old`` when ``old`` is given (released: from the third computation on)."""
    protos = [torch.zeros(n_classes, f[0].shape[1], device=f[0].device) for f in feats]
    count = [0] * n_classes
    for b, label in enumerate(labels):
        for c, lab in enumerate(label):
            lab = int(lab)
            count[lab] += 1
            for p, f in zip(protos, feats):
                p[lab, :] += f[b][c, :]
    for p in protos:
        for c in range(n_classes):
            p[c, :] /= count[c]
    if old is not None:
        protos = [(1 - momentum) * p + momentum * o for p, o in zip(protos, old)]
    return protos


# --------------------------------------------------------------------------------------------------------
# OPM, TPAMI 2024 (GeWu-Lab/BML_TPAMI2024, code/models/Classifier.py and code/main.py)
# --------------------------------------------------------------------------------------------------------
class _OpmReleasedRescale(torch.autograd.Function):
    """The release's ``custom_autograd``: forward and backward divide by ``1 − θ``, θ read with ``.item()``."""

    @staticmethod
    def forward(ctx, x, theta):
        ctx.save_for_backward(theta)
        return x / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad):
        (theta,) = ctx.saved_tensors
        return grad.clone() / (1 - theta.item()), None


def opm_performance(feat: torch.Tensor, weight_half: torch.Tensor, bias: torch.Tensor, label: torch.Tensor):
    """Released score of one modality: logits from its half of the (detached) concat head plus half the bias,
    then a Python sum over samples of ``softmax(t)[i][int(label[i].item())]`` (the batch softmax per sample)."""
    t = torch.mm(feat, weight_half.t()) + bias / 2
    return sum([F.softmax(t, dim=1)[i][int(label[i].item())] for i in range(t.shape[0])])


def opm_calcu_q(perf_1, perf_2, q_base: float, lam: float) -> torch.Tensor:
    """Released ``calcu_q``: ``tanh(relu(ρ − 1))`` per modality and the host-side ``if ratio > 0`` branches."""
    q = torch.tensor([0.0, 0.0])
    r1 = torch.tanh(torch.relu(perf_1 / perf_2 - 1))
    r2 = torch.tanh(torch.relu(perf_2 / perf_1 - 1))
    q[0] = q_base * (1 + lam * r1) if r1 > 0 else 0
    q[1] = q_base * (1 + lam * r2) if r2 > 0 else 0
    return torch.clip(q, 0.0, 1.0)


def opm_execute_drop(feats: list, q: torch.Tensor, dims: torch.Tensor, p_exe: float, device):
    """Released ``Modality_drop.execute_drop`` for equal feature widths: a host coin (NumPy) decides whether the
    step drops; θ = Σ d q / Σ d; a Bernoulli(1 − q) mask sampled on the CPU and copied over; every modality
    times ``mask / (1 − θ)``; samples with no kept modality removed (``masked_select``). Returns
    ``(features, update_flag)``."""
    import numpy as np

    B = feats[0].shape[0]
    D = feats[0].shape[1]
    exe = torch.tensor(np.random.rand(1)).to(device=device) >= 1 - p_exe
    if not exe:
        return feats, torch.ones([B], dtype=torch.int32, device=device)
    num_mod = len(feats)
    theta = sum(dims * q) / sum(dims)
    mask = torch.distributions.Bernoulli(1 - q).sample([B, 1]).permute(2, 1, 0).contiguous().reshape(
        num_mod, B, -1).to(device=device)
    stacked = torch.mul(torch.stack(feats, dim=0), mask)
    stacked = _OpmReleasedRescale.apply(stacked, theta)
    mask = torch.transpose(mask, 0, 1).squeeze(-1)
    flag = torch.sum(mask, dim=1) > 0
    kept = torch.masked_select(stacked, flag.unsqueeze(-1)).reshape(num_mod, -1, D)
    return [c.squeeze(0) for c in torch.chunk(kept, num_mod, dim=0)], flag


def opm_step_features(feat_1, feat_2, weight, bias, label, q_base: float = 0.5, lam: float = 0.5,
                      p_exe: float = 0.7):
    """What the released OPM adds to a forward pass after the encoders (warm-up over): the two scores, ``q``,
    the drop. Returns ``(feat_1, feat_2, update_flag)``; the caller filters its labels by ``update_flag``."""
    w, b = weight.clone().detach(), bias.clone().detach()
    d1 = feat_1.shape[1]
    perf_1 = opm_performance(feat_1, w[:, :d1], b, label)
    perf_2 = opm_performance(feat_2, w[:, d1:], b, label)
    q = opm_calcu_q(perf_1, perf_2, q_base, lam)
    dims = torch.tensor([feat_1.shape[1], feat_2.shape[1]])
    (f1, f2), flag = opm_execute_drop([feat_1, feat_2], q, dims, p_exe, feat_1.device)
    return f1, f2, flag


# ------------------------------------------------------------------------------------------------ InfoReg
# InfoReg (Huang, Wei, Yang & Hu, CVPR 2025, GeWu-Lab/InfoReg_CVPR2025, ``main.py`` ``train_epoch``): at the
# start of every epoch a deep copy of the model (the anchors) and the window value k from the audio trace
# history (which starts as ten zeros); per step, after the three backward passes, the scores as Python sums
# over the batch (the batch softmax recomputed per sample), a host-side branch on them and on k, the pull
# ``grad += beta * (theta - theta0)`` over every parameter of the model with an identity search of the
# encoder's parameters, then ``grad * grad`` accumulated per conv/linear weight of each encoder; at the
# epoch's end each accumulator's mean read with ``.item()`` and the means summed.
INFOREG_RELEASED_BETA = (0.95, 0.1)  # audio, visual
INFOREG_RELEASED_THRESHOLD = 0.05


def inforeg_window_k(audio_trace_list: list, epoch: int) -> float:
    """Released k at the start of ``epoch`` (``audio_trace_list``: ten zeros, then one trace per epoch)."""
    if epoch == 0:
        return 1
    tr1 = sum(audio_trace_list[-10:]) / 10
    tr2 = sum(audio_trace_list[-11:-1]) / 10
    return (tr1 - tr2) / tr1


def inforeg_fisher_accumulators(model, prefix: str) -> dict:
    """Released per-epoch accumulators: one zero tensor per conv/linear weight whose module name contains
    ``prefix`` (``'audio_net'`` / ``'visual_net'`` in the released model)."""
    return {name: torch.zeros_like(m.weight) for name, m in model.named_modules()
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and prefix in name and m.weight.requires_grad}


def inforeg_step_regulation(model, global_model, audio_net, visual_net, out_a, out_v, label, k, fim_audio: dict,
                            fim_visual: dict, threshold: float = INFOREG_RELEASED_THRESHOLD) -> tuple:
    """The released step between ``backward()`` and ``optimizer.step()``; returns ``(beta_audio, beta_visual)``.
    ``threshold``: the released constant 0.05 (a parameter only so tests can close the window early)."""
    score_v = sum([F.softmax(out_v, dim=1)[i][label[i]] for i in range(out_v.size(0))])
    score_a = sum([F.softmax(out_a, dim=1)[i][label[i]] for i in range(out_a.size(0))])
    if score_a > score_v and k > threshold:
        beta, beta2 = INFOREG_RELEASED_BETA[0] * torch.exp(torch.tanh(score_a - score_v)), 0
    elif score_a < score_v and k > threshold:
        beta, beta2 = 0, INFOREG_RELEASED_BETA[1] * torch.exp(torch.tanh(score_v - score_a))
    else:
        beta, beta2 = 0, 0
    for mp, gp in zip(model.parameters(), global_model.parameters()):
        if mp.requires_grad and any(mp is p for p in audio_net.parameters()):
            mp.grad += beta * (mp - gp)
        if mp.requires_grad and any(mp is p for p in visual_net.parameters()):
            mp.grad += beta2 * (mp - gp)
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            if name in fim_audio and m.weight.requires_grad:
                fim_audio[name] += m.weight.grad * m.weight.grad
                fim_audio[name].detach_()
            elif name in fim_visual and m.weight.requires_grad:
                fim_visual[name] += m.weight.grad * m.weight.grad
                fim_visual[name].detach_()
    return beta, beta2


def inforeg_epoch_trace(fim: dict) -> float:
    """Released end-of-epoch trace: the sum over layers of each accumulator's mean (one ``.item()`` each)."""
    return sum(acc.mean().item() for acc in fim.values())


# ------------------------------------------------------------------------------------------------ MMPareto
# MMPareto (Wei & Hu, ICML 2024, GeWu-Lab/MMPareto_ICML2024, ``code/MMPareto.py`` ``train_epoch``): after the
# forward pass, one ``backward(retain_graph=True)`` per loss (multimodal first, then each unimodal loss), each
# followed by cloning the recorded encoder gradients (and a flattened concatenation of them) and zeroing every
# gradient; per encoder the cosine of the concatenations tested on the host; on a conflict, the solver's dot
# products accumulated tensor by tensor (the concatenation included, so each sum is counted twice: the ratio
# that sets the weight is unchanged) and read back with ``.cpu()``; then one more backward of the summed
# losses, and a loop over the encoder parameters replacing each gradient by ``γ·g_new`` or ``γ·d·g_new`` after
# a host-side test of ``d = ‖grad‖ / ‖g_new‖ > 1``. Heads keep the summed loss's gradient.
MMPARETO_RELEASED_GAMMA = 1.5


def mmpareto_min_norm_2(dps: dict) -> float:
    """The released solver's two-task case (``MinNormSolver._min_norm_element_from2``): the first vector's weight."""
    v11, v12, v22 = dps[(0, 0)], dps[(0, 1)], dps[(1, 1)]
    if v12 >= v11:
        return 0.999
    if v12 >= v22:
        return 0.001
    return float(-1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12)))


def mmpareto_step(encoders: dict, losses: list, zero_grad, gamma: float = MMPARETO_RELEASED_GAMMA) -> int:
    """Released MMPareto step after the forward pass. ``encoders``: ``{name: [(param_name, param), ...]}``;
    ``losses``: ``[L_mm, L_1, ..., L_M]`` in the encoders' order; ``zero_grad()`` zeroes every gradient of the
    model (the released ``optimizer.zero_grad()``). Returns the number of backward passes (M + 2)."""
    names = list(encoders)
    grads = {m: {} for m in names}
    for idx, loss in enumerate(losses):
        loss.backward(retain_graph=True)
        kind = "both" if idx == 0 else names[idx - 1]
        for m in names if idx == 0 else [kind]:
            rec = {n: p.grad.data.clone() for n, p in encoders[m]}
            rec["concat"] = torch.cat([rec[n].flatten() for n, _ in encoders[m]])
            grads[m][kind] = rec
        zero_grad()
    weights = {}
    for m in names:
        cos = F.cosine_similarity(grads[m]["both"]["concat"], grads[m][m]["concat"], dim=0)
        if cos > 0:
            weights[m] = (0.5, 0.5)
            continue
        vecs = [list(grads[m]["both"].values()), list(grads[m][m].values())]
        dps = {}
        for i, j in ((0, 1), (0, 0), (1, 1)):
            total = 0.0
            for k in range(len(vecs[i])):
                total += torch.mul(vecs[i][k], vecs[j][k]).sum().data.cpu()
            dps[(i, j)] = total
        c = mmpareto_min_norm_2(dps)
        weights[m] = (c, 1 - c)
    sum(losses).backward()
    for m in names:
        w_mm, w_m = weights[m]
        for n, p in encoders[m]:
            if p.grad is None:
                continue
            three_norm = torch.norm(p.grad.data.clone())
            new_grad = 2 * w_mm * grads[m]["both"][n] + 2 * w_m * grads[m][m][n]
            diff = three_norm / torch.norm(new_grad)
            p.grad = diff * new_grad * gamma if diff > 1 else new_grad * gamma
    return len(losses) + 1
