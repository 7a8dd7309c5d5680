"""Bad input to every checked public entry of the ops frm, frm_ref, modality_scores, decision_fuse and
grad_scale (``modality_scores_ref`` and ``decision_fuse_ref`` are the unchecked benchmark baselines).

Table-driven: each case builds fresh inputs, clones every tensor it passes, makes one bad call, and checks

- the exception type (TypeError for a wrong type, ValueError for a wrong value),
- that the message names the function and the argument (a substring),
- that every input tensor is bit-identical afterwards (validate everything, then compute).

Run on both backends (``reference`` and Triton under the interpreter): validation comes before dispatch, so
the outcome must not depend on it.
"""
import math

import pytest
import torch

import mmkernels

NAN, INF = float("nan"), float("inf")
M, B, K = 2, 4, 3

ENTRIES = {
    "frm": lambda: mmkernels.frm,
    "frm_ref": lambda: mmkernels.frm_ref,
    "modality_scores": lambda: mmkernels.modality_scores,
    "decision_fuse": lambda: mmkernels.decision_fuse,
    "grad_scale": lambda: mmkernels.grad_scale,
}


def _image(*shape, dtype=torch.float32):
    return torch.rand(*shape, dtype=dtype)


def _logits():
    return torch.randn(M, B, K)


def _labels():
    return torch.tensor([0, 2, -100, 1])


def _fuse_args():
    return [torch.randn(M, B, K), torch.rand(M, K) + 0.1, torch.rand(M) + 0.5]


# (entry, id, build() -> (args, kwargs), exception, substring of the message)
CASES = []


def case(entry, name, build, exc, text):
    CASES.append(pytest.param(entry, build, exc, text, id=f"{entry}-{name}"))


for fn in ("frm", "frm_ref"):
    img = lambda: _image(2, 1, 8, 8)  # noqa: E731
    case(fn, "x-list", lambda: ([[[1.0]]], {}), TypeError, "x must be a torch.Tensor")
    case(fn, "x-int", lambda: ([torch.ones(1, 1, 8, 8, dtype=torch.int64)], {}), TypeError, "x must be float16")
    case(fn, "x-complex", lambda: ([torch.ones(1, 1, 8, 8, dtype=torch.complex64)], {}), TypeError, "x must be float16")
    case(fn, "x-rank3", lambda: ([_image(1, 8, 8)], {}), ValueError, "x must have shape (B, C, H, W)")
    case(fn, "x-rank5", lambda: ([_image(1, 1, 1, 8, 8)], {}), ValueError, "x must have shape (B, C, H, W)")
    case(fn, "x-H-not-multiple", lambda: ([_image(1, 1, 12, 8)], {}), ValueError, "multiples of patch_size=8")
    case(fn, "patch_size-float", lambda: ([img()], {"patch_size": 8.0}), TypeError, "patch_size must be an int")
    case(fn, "patch_size-bool", lambda: ([img()], {"patch_size": True}), TypeError, "patch_size must be an int")
    case(fn, "patch_size-str", lambda: ([img()], {"patch_size": "8"}), TypeError, "patch_size must be an int")
    case(fn, "patch_size-1", lambda: ([img()], {"patch_size": 1, "window": 1}), ValueError, "patch_size must be an int in")
    case(fn, "patch_size-negative", lambda: ([img()], {"patch_size": -8}), ValueError, "patch_size must be an int in")
    case(fn, "window-0", lambda: ([img()], {"window": 0}), ValueError, "window must be an int with 1 <= window")
    case(fn, "window-overlap", lambda: ([img()], {"window": 5}), ValueError, "window must be an int with 1 <= window")
    case(fn, "window-float", lambda: ([img()], {"window": 2.0}), TypeError, "window must be an int")
    case(fn, "window-None", lambda: ([img()], {"window": None}), TypeError, "window must be an int")
    for bad in (NAN, INF, -INF):
        case(fn, f"eps-{bad}", lambda bad=bad: ([img()], {"eps": bad}), ValueError, "eps must be a finite number")
    for bad in ("a", None, True, [1e-6]):
        case(fn, f"eps-{type(bad).__name__}", lambda bad=bad: ([img()], {"eps": bad}), TypeError, "eps must be a real number")
    case(fn, "eps-tensor", lambda: ([img()], {"eps": torch.tensor(1e-6)}), TypeError, "eps must be a real number")
    case(fn, "reduction-mean", lambda: ([img()], {"reduction": "mean"}), ValueError, "reduction must be one of")
    case(fn, "reduction-None", lambda: ([img()], {"reduction": None}), TypeError, "reduction must be a str")

ms = "modality_scores"
case(ms, "logits-str", lambda: (["x", _labels()], {}), TypeError, "logits must be a tensor or a list/tuple")
case(ms, "logits-rank2", lambda: ([torch.randn(B, K), _labels()], {}), ValueError, "logits must be (M, B, K)")
case(ms, "logits-rank4", lambda: ([torch.randn(M, B, K, 1), _labels()], {}), ValueError, "logits must be (M, B, K)")
case(ms, "logits-empty-list", lambda: ([[], _labels()], {}), ValueError, "logits is an empty sequence")
case(ms, "logits-item-not-tensor", lambda: ([[torch.randn(B, K), 5], _labels()], {}), TypeError, "logits[1] must be a torch.Tensor")
case(ms, "logits-item-rank3", lambda: ([[torch.randn(B, K, 1)], _labels()], {}), ValueError, "logits[0] must have shape (B, K)")
case(ms, "logits-items-shape", lambda: ([[torch.randn(B, K), torch.randn(B, K + 1)], _labels()], {}), ValueError, "every logits[m] must share")
case(ms, "logits-items-dtype", lambda: ([[torch.randn(B, K), torch.randn(B, K).double()], _labels()], {}), ValueError, "every logits[m] must share")
case(ms, "logits-int", lambda: ([_logits().long(), _labels()], {}), TypeError, "logits must be float16")
case(ms, "logits-K0", lambda: ([torch.randn(M, B, 0), _labels()], {}), ValueError, "logits need at least one modality and one class")
case(ms, "logits-M0", lambda: ([torch.randn(0, B, K), _labels()], {}), ValueError, "logits need at least one modality and one class")
case(ms, "labels-list", lambda: ([_logits(), [0, 1, 2, 0]], {}), TypeError, "labels must be a torch.Tensor")
case(ms, "labels-int32", lambda: ([_logits(), _labels().int()], {}), TypeError, "labels must be int64")
case(ms, "labels-float", lambda: ([_logits(), _labels().float()], {}), TypeError, "labels must be int64")
case(ms, "labels-short", lambda: ([_logits(), _labels()[:3]], {}), ValueError, "labels must have shape (B,) = (4,)")
case(ms, "labels-column", lambda: ([_logits(), _labels()[:, None]], {}), ValueError, "labels must have shape (B,) = (4,)")
for bad in (K, K + 5, -1, -101):
    case(ms, f"labels-out-of-range-{bad}", lambda bad=bad: ([_logits(), torch.tensor([0, bad, -100, 1])], {}),
         ValueError, f"labels must lie in [0, {K}) or equal -100 (ignored); got [{bad}]")
case(ms, "labels-out-of-range-masked", lambda: ([_logits(), torch.tensor([0, 7, 1, 1]), torch.zeros(B, M)], {}),
     ValueError, "labels must lie in [0, 3)")
case(ms, "mask-list", lambda: ([_logits(), _labels(), [[1, 1]] * B], {}), TypeError, "mask must be a torch.Tensor")
case(ms, "mask-int", lambda: ([_logits(), _labels(), torch.ones(B, M, dtype=torch.long)], {}), TypeError, "mask must be bool or floating")
case(ms, "mask-transposed", lambda: ([_logits(), _labels(), torch.ones(M, B)], {}), ValueError, "mask must have shape (B, M) = (4, 2)")
case(ms, "mask-rank3", lambda: ([_logits(), _labels(), torch.ones(B, M, 1)], {}), ValueError, "mask must have shape (B, M)")
case(ms, "check_labels-str", lambda: ([_logits(), _labels()], {"check_labels": "yes"}), TypeError, "check_labels must be None, True or False")
case(ms, "check_labels-int", lambda: ([_logits(), _labels()], {"check_labels": 1}), TypeError, "check_labels must be None, True or False")

df = "decision_fuse"


def _fuse(i, value):
    def build():
        args = _fuse_args()
        args[i] = value() if callable(value) else value
        return args, {}
    return build


def _fuse_kw(**kw):
    def build():
        return _fuse_args(), {k: (v() if callable(v) else v) for k, v in kw.items()}
    return build


case(df, "logits-numpy", _fuse(0, lambda: torch.randn(M, B, K).numpy()), TypeError, "logits must be a torch.Tensor")
case(df, "logits-int", _fuse(0, lambda: torch.ones(M, B, K, dtype=torch.long)), TypeError, "logits must be float16")
case(df, "logits-rank2", _fuse(0, lambda: torch.randn(B, K)), ValueError, "logits must have shape (M, B, K)")
case(df, "logits-K0", lambda: ([torch.randn(M, B, 0), torch.rand(M, 0), torch.rand(M)], {}), ValueError, "logits needs at least one modality")
case(df, "weights-list", _fuse(1, [[1.0] * K] * M), TypeError, "weights must be a torch.Tensor")
case(df, "weights-int", _fuse(1, lambda: torch.ones(M, K, dtype=torch.long)), TypeError, "weights must be float16")
case(df, "weights-transposed", _fuse(1, lambda: torch.rand(K, M)), ValueError, "weights must have shape (M, K) = (2, 3)")
case(df, "weights-nan", _fuse(1, lambda: torch.tensor([[1.0, NAN, 1.0], [1.0, 1.0, 1.0]])), ValueError, "weights must be finite")
case(df, "weights-inf", _fuse(1, lambda: torch.tensor([[1.0, 1.0, 1.0], [INF, 1.0, 1.0]])), ValueError, "weights must be finite")
case(df, "scales-float", _fuse(2, 1.0), TypeError, "scales must be a torch.Tensor")
case(df, "scales-int", _fuse(2, lambda: torch.ones(M, dtype=torch.long)), TypeError, "scales must be float16")
case(df, "scales-column", _fuse(2, lambda: torch.ones(M, 1)), ValueError, "scales must have shape (M,) = (2,)")
for bad in (0.0, NAN, INF, -INF):
    case(df, f"scales-{bad}", _fuse(2, lambda bad=bad: torch.tensor([1.0, bad])), ValueError, "scales must be non-zero and finite")
case(df, "mask-list", _fuse_kw(mask=[[True, True]] * B), TypeError, "mask must be a torch.Tensor")
case(df, "mask-int", _fuse_kw(mask=lambda: torch.ones(B, M, dtype=torch.long)), TypeError, "mask must be bool or floating")
case(df, "mask-transposed", _fuse_kw(mask=lambda: torch.ones(M, B, dtype=torch.bool)), ValueError, "mask must have shape (B, M) = (4, 2)")
case(df, "mask-nan", _fuse_kw(mask=lambda: torch.tensor([[1.0, NAN]] + [[1.0, 1.0]] * (B - 1))), ValueError, "mask must be finite")
case(df, "mask-all-missing", _fuse_kw(mask=lambda: torch.tensor([[True, True], [False, False], [True, False], [False, True]])),
     ValueError, "samples [1] have every modality missing in mask")
case(df, "grad_coeff-list", _fuse_kw(grad_coeff=[1.0, 1.0]), TypeError, "grad_coeff must be a torch.Tensor")
case(df, "grad_coeff-int", _fuse_kw(grad_coeff=lambda: torch.ones(M, dtype=torch.long)), TypeError, "grad_coeff must be float16")
case(df, "grad_coeff-shape", _fuse_kw(grad_coeff=lambda: torch.ones(M + 1)), ValueError, "grad_coeff must have shape (M,) = (2,) or (M, B)")
case(df, "grad_coeff-BM", _fuse_kw(grad_coeff=lambda: torch.ones(B, M)), ValueError, "grad_coeff must have shape (M,) = (2,) or (M, B)")
case(df, "grad_coeff-nan", _fuse_kw(grad_coeff=lambda: torch.tensor([1.0, NAN])), ValueError, "grad_coeff must be finite")
case(df, "grad_coeff-inf", _fuse_kw(grad_coeff=lambda: torch.full((M, B), INF)), ValueError, "grad_coeff must be finite")
case(df, "check_mask-str", _fuse_kw(check_mask="no"), TypeError, "check_mask must be None, True or False")

gs = "grad_scale"
act = lambda: torch.randn(B, 5, requires_grad=True)  # noqa: E731
case(gs, "x-list", lambda: ([[1.0, 2.0], 0.5], {}), TypeError, "x must be a torch.Tensor")
for bad in (NAN, INF, -INF):
    case(gs, f"coeff-{bad}", lambda bad=bad: ([act(), bad], {}), ValueError, "coeff must be a finite number")
for bad in ("a", None, True, [0.5]):
    case(gs, f"coeff-{type(bad).__name__}", lambda bad=bad: ([act(), bad], {}), TypeError, "coeff must be a tensor or a float")
case(gs, "coeff-int-tensor", lambda: ([act(), torch.tensor(1)], {}), TypeError, "coeff must be floating point")
case(gs, "coeff-complex", lambda: ([act(), torch.tensor(1 + 1j)], {}), TypeError, "coeff must be floating point")
case(gs, "coeff-wrong-batch", lambda: ([act(), torch.ones(B + 1)], {}), ValueError, "per-sample coeff of shape (5,)")
case(gs, "coeff-0d-x", lambda: ([torch.tensor(1.0, requires_grad=True), torch.ones(1)], {}), ValueError, "per-sample coeff")
case(gs, "coeff-rank2", lambda: ([act(), torch.ones(B, 1)], {}), ValueError, "coeff must have shape () or (B,)")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, grad flag and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.requires_grad != b.requires_grad:
        return False
    def dense(t):  # row-major bytes, whatever the strides
        d = torch.empty(t.shape, dtype=t.dtype)
        d.copy_(t.detach())
        return (torch.view_as_real(d) if d.is_complex() else d).reshape(-1).view(torch.uint8)
    return torch.equal(dense(a), dense(b))


@pytest.mark.parametrize("backend_name", ["reference", "triton"])
@pytest.mark.parametrize("entry,build,exc,text", CASES)
def test_bad_input_raises_and_mutates_nothing(entry, build, exc, text, backend_name):
    args, kwargs = build()
    before = [(t, t.detach().clone().requires_grad_(t.requires_grad)) for t in _tensors((args, kwargs))]
    fn = ENTRIES[entry]()
    with mmkernels.use_backend(backend_name):
        with pytest.raises(exc) as info:
            fn(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{entry}: "), f"message does not name the function: {message!r}"
    assert text in message, f"expected {text!r} in {message!r}"
    for t, clone in before:
        assert _same_bits(t, clone), f"{entry} changed an input tensor before raising"
        assert t.grad is None


def test_table_covers_every_entry():
    counts = {}
    for p in CASES:
        counts[p.values[0]] = counts.get(p.values[0], 0) + 1
    assert set(counts) == set(ENTRIES), counts
    assert all(n >= 10 for n in counts.values()), counts


def test_valid_input_passes_the_same_checks():
    # the boundary values the table's neighbours reject are accepted
    x = _image(2, 1, 8, 8)
    assert mmkernels.frm(x, patch_size=8, window=4, eps=0.0).shape == (2,)
    assert mmkernels.frm(x, eps=1).shape == (2,)
    s, c = mmkernels.modality_scores(_logits(), _labels(), torch.ones(B, M), check_labels=False)
    assert s.shape == c.shape == (M,)
    z = mmkernels.decision_fuse(*_fuse_args(), mask=torch.ones(B, M), grad_coeff=torch.zeros(M, B), check_mask=True)
    assert z.shape == (B, K) and bool(torch.isfinite(z).all())
    assert math.isfinite(float(mmkernels.grad_scale(torch.ones(3), 0).sum()))
