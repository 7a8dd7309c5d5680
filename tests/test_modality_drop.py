"""modality_drop's eager CPU path (the C++ autograd Function around the extension's kernels) and the
huge-page backed outputs of the CPU kernels of modality_drop and grad_scale: against the float64 oracle of
tests/test_opm.py and plain tensor semantics. The op's rule itself is tested in tests/test_opm.py."""
import io
import os
import pickle
import sys

import pytest
import torch

import mmkernels
from mmkernels.ops import modality_drop as mdm
from tests.test_opm import _features, _gen, _uniforms, oracle

HUGE = 2 << 20


def _eager_op_or_skip():
    if mdm._cpu_eager_op() is None:
        pytest.skip("the extension's mmkernels_C::modality_drop is not built")


def _huge_pages_expected() -> bool:
    return sys.platform.startswith("linux") and "MMKERNELS_NO_HUGEPAGES" not in os.environ


@pytest.mark.parametrize("use", ["all", "some", "create_graph"])
def test_cpu_function_against_oracle(use):
    _eager_op_or_skip()
    B = 11
    feats = [x.requires_grad_() for x in _features(B)]
    M = len(feats)
    q = torch.tensor([0.6, 0.5, 0.9, 0.3, 0.7])
    mask = torch.rand(B, M, generator=_gen(3)) > 0.3
    outs, factor = mmkernels.modality_drop(feats, q, mask=mask, generator=_gen(21))
    assert "ModalityDropFunction" in outs[0].grad_fn.name()  # the C++ Function, not a Python fallback
    ref, ref_factor = oracle([x.detach() for x in feats], q, _uniforms(21, B, M), None, mask)
    assert torch.equal(factor.double(), ref_factor) and not factor.requires_grad
    fb = [ref_factor[:, m].view((-1,) + (1,) * (x.dim() - 1)) for m, x in enumerate(feats)]
    if use == "create_graph":
        # loss = sum_m sum(out_m²): gradient 2·f²·x, and the gradient of sum(gradient) is 2·f² (float64 only)
        loss = sum((o.double() ** 2).sum() for o in outs)
        grads = torch.autograd.grad(loss, feats, create_graph=True)
        for m in (2,):  # the float64 modality: exact enough to compare the second derivative
            torch.testing.assert_close(grads[m].double(), 2 * fb[m] ** 2 * feats[m].detach().double())
        (hess,) = torch.autograd.grad(grads[2].sum(), feats[2])
        torch.testing.assert_close(hess, (2 * fb[2] ** 2).expand_as(hess))
        return
    used = range(M) if use == "all" else (0, 3)
    ups = {m: torch.randn(outs[m].shape, generator=_gen(m)).to(outs[m].dtype) for m in used}
    grads = torch.autograd.grad([outs[m] for m in used], feats, [ups[m] for m in used], allow_unused=True)
    for m, (g, x) in enumerate(zip(grads, feats)):
        assert g.shape == x.shape and g.dtype == x.dtype
        tol = 1e-2 if x.dtype == torch.bfloat16 else 1e-6
        if m in ups:
            torch.testing.assert_close(g.double(), ups[m].double() * fb[m], rtol=tol, atol=tol)
        else:  # an output that did not reach the loss: an exact zero gradient
            assert torch.equal(g, torch.zeros_like(g))


def test_cpu_function_checks_before_the_draw():
    _eager_op_or_skip()
    from mmkernels import _ext

    x, y = torch.randn(4, 3), torch.randn(3, 2)
    g = _gen(5)
    state = g.get_state().clone()
    with pytest.raises(RuntimeError, match="rows"):
        _ext.ops().modality_drop([x, y], torch.tensor([0.5, 0.5]), None, None, g)
    assert torch.equal(g.get_state(), state)


def _huge_outputs():
    """A modality_drop output, a modality_drop input gradient and a grad_scale gradient, each 2.4 MB."""
    x = torch.randn(2, 300_000, requires_grad=True)
    outs, factor = mmkernels.modality_drop([x, torch.randn(2, 3)], torch.tensor([0.0, 0.5]), generator=_gen(1))
    up = torch.randn(2, 300_000)
    (dx,) = torch.autograd.grad(outs[0], x, up)
    coeff = torch.tensor(0.7)
    (dg,) = torch.autograd.grad(mmkernels.grad_scale(x, coeff), x, up)
    return [(outs[0].detach(), x.detach()), (dx, up), (dg, up * coeff)]


def test_huge_page_outputs_behave_like_tensors(tmp_path):
    _eager_op_or_skip()
    for t, want in _huge_outputs():
        assert torch.equal(t, want)
        if _huge_pages_expected():
            assert t.data_ptr() % HUGE == 0  # the 2 MiB-aligned, madvised block (csrc/cpu_alloc.h)
        t.add_(1)
        want = want + 1
        assert torch.equal(t, want)
        n = t.numel()
        t.resize_(n + 1_000_000)  # a resizable storage, like at::empty's
        assert torch.equal(t[:n].view(want.shape), want)
        t.resize_(want.shape)
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf), want)
        assert torch.equal(pickle.loads(pickle.dumps(t)), want)
        assert torch.equal(torch.from_numpy(t.numpy()), want) and t.numpy().ctypes.data == t.data_ptr()
        t.share_memory_()
        assert t.is_shared() and torch.equal(t, want)


def test_huge_page_gradient_accumulates_into_grad():
    # the first backward's gradient becomes x.grad (autograd keeps the fresh tensor); the second adds in place
    x = torch.randn(4, 200_000, requires_grad=True)
    coeff = torch.rand(4)
    up = torch.randn(4, 200_000)
    for _ in range(2):
        mmkernels.grad_scale(x, coeff).backward(up)
    torch.testing.assert_close(x.grad, 2 * up * coeff[:, None], rtol=1e-6, atol=0)
    x.grad.mul_(0.5)
    torch.testing.assert_close(x.grad, up * coeff[:, None], rtol=1e-6, atol=0)
