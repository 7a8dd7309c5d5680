"""AGM training step (issue 14 §3, §6): ours against transcriptions of both released steps, side by side.

Model and data as :mod:`mmkernels.bench.bench_overhead` (two small CNN encoders with batch norm, concat head,
SGD with momentum; CPU B = 64, S = 64, c = 16, K = 10; ``quick``: B = 16, S = 32). Every case is one whole
step (zero_grad, forwards, loss, backward, modulation, optimizer step) on its own copy of one initial model:

- ``baseline``: no balancing;
- ``AGM_linear``: responses from the split concat head (:func:`~mmkernels.balance.agm_linear_responses`),
  activation mode: one forward;
- ``AGM_stacked``: the authors' semantics through :func:`~mmkernels.balance.coalition_logits` with the
  training forward's logits as the full coalition: the two masked copies in one eval-mode forward;
- ``AGM_stacked_benchmark``: BalanceBenchmark's semantics (all three coalitions in one eval-mode forward,
  ``form="benchmark"``, parameter mode on the >= 2-D weights);
- ``released_authors``: :func:`mmkernels.bench.released.agm_authors_step` (four forwards with autograd, the
  backward through all of them, hooks, per-sample score loop, host-side coefficients, clip test);
- ``released_benchmark``: :func:`mmkernels.bench.released.agm_benchmark_step` (three eval forwards, the
  training forward, per-sample loop, per-parameter ``grad *= k`` loop, clip test).

``forward_calls`` / ``forward_samples``: model calls and samples through the encoders in one step, counted by
a forward pre-hook on the model (outside the timing). ``speedup_vs_released`` compares each of ours with the
release of the same semantics (authors' for ``AGM_linear``/``AGM_stacked``, BalanceBenchmark's for
``AGM_stacked_benchmark``). CPU timing: one intra-op thread, cases interleaved round-robin, median over rounds.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from mmkernels.bench import released
from mmkernels.bench.bench_overhead import _config, _interleaved, setup
from mmkernels.bench.harness import DEFAULTS, combine, time_interleaved

_RELEASE_OF = {"AGM_linear": "released_authors", "AGM_stacked": "released_authors",
               "AGM_stacked_benchmark": "released_benchmark"}


def _cases(cfg: dict, device: str):
    from mmkernels import policies
    from mmkernels.balance import AGM, agm_linear_responses, coalition_logits

    xa, xv, y, fresh, cases = setup(cfg, device, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9,
                                                                               weight_decay=1e-4))
    alpha = 0.1

    def baseline():
        m, opt = fresh()

        def run():
            opt.zero_grad()
            F.cross_entropy(m(xa, xv)[0], y).backward()
            opt.step()
        return m, run

    def ours_linear():
        m, opt = fresh()
        bal = AGM({"audio": m.audio, "visual": m.visual}, alpha=alpha, epochs=(0, None))

        def run():
            opt.zero_grad()
            out, ha, hv = m(xa, xv)
            with torch.no_grad():
                bal.step(agm_linear_responses(m.head, {"audio": ha, "visual": hv}), y, epoch=0)
            F.cross_entropy(out, y).backward()
            bal.after_backward()
            opt.step()
        return m, run

    def ours_stacked(form):
        m, opt = fresh()
        kw = dict(mode="parameter", params="weights") if form == "benchmark" else {}
        bal = AGM({"audio": m.audio, "visual": m.visual}, alpha=alpha, form=form, epochs=(0, None), **kw)

        def fwd(d):
            return m(d["audio"], d["visual"])[0]

        def run():
            opt.zero_grad()
            out, _, _ = m(xa, xv)
            f = coalition_logits(fwd, {"audio": xa, "visual": xv}, module=m,
                                 full=out if form == "authors" else None)
            bal.step(policies.agm_shapley(f, form), y, epoch=0)
            F.cross_entropy(out, y).backward()
            bal.after_backward()
            opt.step()
        return m, run

    def released_authors():
        m, opt = fresh()
        state, it = released.agm_authors_state(), [0]

        def run():
            it[0] += 1
            released.agm_authors_step(m, lambda a, v: m(a, v)[0], opt, xa, xv, y, state, it[0], 0, alpha,
                                      head_weight=m.head.weight)
        return m, run

    def released_benchmark():
        m, opt = fresh()
        scores, it = {"audio": 0.0, "visual": 0.0}, [0]

        def run():
            it[0] += 1
            released.agm_benchmark_step(m, lambda d: m(d["audio"], d["visual"])[0], opt, {"audio": xa, "visual": xv},
                                        y, scores, it[0], alpha, head_weight=m.head.weight)
        return m, run

    models = {}
    for name, build in (("baseline", baseline), ("AGM_linear", ours_linear), ("AGM_stacked", lambda: ours_stacked("authors")),
                        ("AGM_stacked_benchmark", lambda: ours_stacked("benchmark")),
                        ("released_authors", released_authors), ("released_benchmark", released_benchmark)):
        models[name], cases[name] = build()
    return cases, models


def _count_forwards(model, fn) -> tuple[int, int]:
    seen = [0, 0]

    def pre(_module, args):
        seen[0] += 1
        seen[1] += args[0].shape[0]

    h = model.register_forward_pre_hook(pre)
    try:
        fn()
    finally:
        h.remove()
    return seen[0], seen[1]


def run(device: str, quick: bool) -> list[dict]:
    cfg = _config(device, quick)
    cases, models = _cases(cfg, device)
    counts = {name: _count_forwards(models[name], fn) for name, fn in cases.items()}
    threads = torch.get_num_threads()
    if device == "cuda":
        timed = time_interleaved(cases, device, quick)
    else:
        torch.set_num_threads(1)  # oversubscribed OpenMP threads on a shared CPU would swamp the differences
        try:
            runs = [_interleaved(cases, rounds=4 if quick else 20) for _ in range(DEFAULTS["repeats"])]
            timed = {name: combine([r[name] for r in runs]) for name in cases}
        finally:
            torch.set_num_threads(threads)
    shape = f"B={cfg['B']} S={cfg['S']} c={cfg['c']} K={cfg['K']} M=2"
    base = timed["baseline"]["median_ms"]
    rows = []
    for name, t in timed.items():
        row = {"op": "agm_step", "shape": shape, "impl": name, "device": device, **t,
               "role": "released" if name.startswith("released") else ("ours" if name != "baseline" else None),
               "threads": 1 if device == "cpu" else threads,
               "overhead_pct": 100.0 * (t["median_ms"] - base) / base, "speedup_vs_baseline": base / t["median_ms"]}
        if row["role"] is None:
            del row["role"]
        row.update(forward_calls=counts[name][0], forward_samples=counts[name][1])
        if name in _RELEASE_OF:
            row["released"] = _RELEASE_OF[name]
            row["speedup_vs_released"] = timed[_RELEASE_OF[name]]["median_ms"] / t["median_ms"]
        rows.append(row)
    return rows
