"""Balancers under real multi-process data parallelism: 2 ranks, gloo backend, CPU (SPEC §4, issue 4 §3).

What is checked:

- DDP + OGM-GE in parameter mode with GE noise: after a few optimizer steps the parameters are
  bit-identical on both ranks (statistics all-reduced -> same coefficients; GE noise drawn from generators
  seeded identically on every rank, applied after DDP's gradient all-reduce -> same noise).
- DDP + OGM-GE in activation mode (no noise) and DDP + MWAM (gradient mode, activation): bit-identical
  across ranks *and* equal (float tolerance) to a single-process run on the concatenated batch, which is
  what the mathematics says: the statistics are sums over the global batch, DDP averages gradients of the
  per-rank mean losses (equal shard sizes), and the gradient scaling is linear.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) on gloo/CPU with OGM-GE activation mode: equal to the
  single-process run as well. That is the FSDP status: activation mode works (it only touches encoder
  outputs). Parameter mode under FSDP modulates the local gradient *shards* (``p.grad`` of a sharded
  parameter is a DTensor shard); the coefficient is exact but the GE noise std is per shard, not per full
  tensor as in the released code, and it is not tested here.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.helpers import run_on_ranks

K = 4
B_GLOBAL = 16
STEPS = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.audio = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                   nn.Linear(16, 6))
        self.visual = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                    nn.Linear(16, 6))
        self.head = nn.Linear(12, K)

    def forward(self, xa, xv):
        from mmkernels.balance import split_linear_head

        ha, hv = self.audio(xa) * 3.0, self.visual(xv)  # audio made dominant so OGM-GE modulates
        return self.head(torch.cat([ha, hv], 1)), split_linear_head(self.head, {"audio": ha, "visual": hv})


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randn(B_GLOBAL, 1, 8, 8, generator=g), torch.randn(B_GLOBAL, 3, 8, 8, generator=g),
            torch.randint(0, K, (B_GLOBAL,), generator=g))


def _train(model, inner, method, rank=0, world=1):
    from mmkernels.balance import MWAM, OGMGE

    encs = {"audio": inner.audio, "visual": inner.visual}
    if method == "ogm_param_ge":
        bal = OGMGE(encs, alpha=0.8, mode="parameter", params="conv", noise="ge", seed=11)
    elif method == "ogm_act":
        bal = OGMGE(encs, alpha=0.8)
    else:
        bal = MWAM(encs, apply="gradient")
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    shard = slice(rank * B_GLOBAL // world, (rank + 1) * B_GLOBAL // world)
    coeffs = []
    for step in range(STEPS):
        xa, xv, y = (t[shard] for t in _data(step))
        opt.zero_grad()
        fused, uni = model(xa, xv)
        if method == "mwam":
            bal.step(inputs={"audio": xa, "visual": xv}, epoch=0)
        else:
            bal.step(logits=uni, labels=y, epoch=0)
        F.cross_entropy(fused, y).backward()
        bal.after_backward()
        opt.step()
        coeffs.append(bal.coefficient_tensor.clone())
    return torch.stack(coeffs)


def _full_params(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, "full_tensor"):  # FSDP2 DTensor shard
            t = t.full_tensor()
        out[n.replace("module.", "")] = t.clone()
    return out


def _worker(rank, world):
    results = {}
    for method in ("ogm_param_ge", "ogm_act", "mwam"):
        torch.manual_seed(0)
        net = Net()
        ddp = nn.parallel.DistributedDataParallel(net)
        coeffs = _train(ddp, net, method, rank, world)
        results[method] = {"params": _full_params(net), "coeffs": coeffs}
    try:  # FSDP2 on CPU/gloo, activation mode
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        net = Net()
        fully_shard(net.audio)
        fully_shard(net.visual)
        fully_shard(net)
        coeffs = _train(net, net, "ogm_act", rank, world)
        results["fsdp_ogm_act"] = {"params": _full_params(net), "coeffs": coeffs}
    except Exception as exc:  # noqa: BLE001 - reported to the test, which decides
        results["fsdp_error"] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def ddp_results():
    ranks = run_on_ranks(_worker)
    single = {}
    for method in ("ogm_param_ge", "ogm_act", "mwam"):
        torch.manual_seed(0)
        net = Net()
        coeffs = _train(net, net, method)
        single[method] = {"params": _full_params(net), "coeffs": coeffs}
    return ranks, single


@pytest.mark.parametrize("method", ["ogm_param_ge", "ogm_act", "mwam"])
def test_ranks_bit_identical(ddp_results, method):
    ranks, _ = ddp_results
    r0, r1 = ranks[0][method], ranks[1][method]
    assert torch.equal(r0["coeffs"], r1["coeffs"])
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), f"{method}: {n} differs across ranks"


@pytest.mark.parametrize("method", ["ogm_act", "mwam"])
def test_ddp_equals_single_process_on_concatenated_batch(ddp_results, method):
    ranks, single = ddp_results
    got, want = ranks[0][method], single[method]
    assert float((got["coeffs"] - 1).abs().max()) > 1e-3  # the balancer really modulated
    torch.testing.assert_close(got["coeffs"], want["coeffs"], rtol=1e-5, atol=1e-6)
    for n in want["params"]:
        torch.testing.assert_close(got["params"][n], want["params"][n], rtol=1e-4, atol=1e-5,
                                   msg=lambda s: f"{method}: {n}: {s}")


def test_ddp_ge_noise_coefficients_match_single_process(ddp_results):
    # the noise differs from the single-process run (different RNG consumption is not the point), but the
    # first step's coefficients are computed before any noise touched the weights and must agree
    ranks, single = ddp_results
    torch.testing.assert_close(ranks[0]["ogm_param_ge"]["coeffs"][0], single["ogm_param_ge"]["coeffs"][0])


def test_fsdp2_activation_mode(ddp_results):
    ranks, single = ddp_results
    if "fsdp_error" in ranks[0]:
        pytest.skip(f"FSDP2 fully_shard unavailable on CPU/gloo here: {ranks[0]['fsdp_error']}")
    r0, r1 = ranks[0]["fsdp_ogm_act"], ranks[1]["fsdp_ogm_act"]
    assert torch.equal(r0["coeffs"], r1["coeffs"])
    for n in single["ogm_act"]["params"]:
        torch.testing.assert_close(r0["params"][n], single["ogm_act"]["params"][n], rtol=1e-4, atol=1e-5)
