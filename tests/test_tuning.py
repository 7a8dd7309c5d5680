"""Launch configurations: every candidate of every Triton kernel computes the right answer, and the selection
(forced config, autotune search, tuned table, heuristic) behaves as documented in ``mmkernels._tuning``."""
import dataclasses
import json

import pytest
import torch

import mmkernels
from mmkernels import _tuning
from tests.helpers import assert_close
from tests.oracles import band_energy_1d_diff as oracle_1d_diff
from tests.oracles import band_energy_2d_diff as oracle_2d_diff
from tests.oracles import decision_fuse as fuse_oracle
from tests.oracles import frm as frm_oracle
from tests.oracles import modality_scores as scores_oracle
from tests.test_band_energy import assert_bands_close
from tests.test_frm import well_conditioned


def _space(call):
    """Run ``call`` once and return {kernel: (heuristic, candidates)} of every launch it made."""
    with _tuning.recording() as log:
        call()
    return {name: (heur, cands) for name, _key, heur, cands in log}


def _each_config(call, check):
    """For every kernel launched by ``call``, run ``call`` with each of its candidates forced and ``check`` it.
    The interpreter ignores num_warps / num_stages, so on the CPU configs differing only there run once."""
    spaces = _space(call)
    assert spaces, "the op launched no Triton kernel"
    n = 0
    for name, (heur, cands) in spaces.items():
        assert heur in cands
        seen = set()
        for cfg in cands:
            if not torch.cuda.is_available():
                tiles = _tuning.cfg_str({k: v for k, v in cfg.items() if k not in ("num_warps", "num_stages")})
                if tiles in seen:
                    continue
                seen.add(tiles)
            with _tuning.forced(name, cfg):
                check(call(), f"{name} {_tuning.cfg_str(cfg)}")
            n += 1
    return n


@pytest.fixture
def triton_backend():
    with mmkernels.use_backend("triton"):
        yield


# ----------------------------------------------------------------------------------------- every candidate is right

def test_frm_every_config(triton_backend, device):
    x = well_conditioned((3, 2, 16, 40), 8, 2, torch.float32, device)
    want, _ = frm_oracle(x)
    n = _each_config(lambda: mmkernels.frm(x, window=2, reduction="none"),
                     lambda got, what: assert_close(got, want, rtol=3e-5, atol=0, what=what))
    assert n >= 16 if torch.cuda.is_available() else n >= 4


def test_modality_scores_every_config(triton_backend, device):
    logits = torch.randn(2, 9, 300, device=device) * 3
    labels = torch.randint(0, 300, (9,), device=device)
    labels[4] = -100
    want_s, want_c = scores_oracle(logits, labels)

    def check(got, what):
        assert_close(got[0], want_s, rtol=1e-5, atol=1e-6, what=what + " scores")
        assert_close(got[1], want_c, rtol=0, atol=0, what=what + " correct")

    n = _each_config(lambda: mmkernels.modality_scores(logits, labels), check)
    assert n >= 3  # K chunks of 256 (two chunks) and 512, row tiles


def test_decision_fuse_every_config(triton_backend, device):
    M, B, K = 3, 5, 700
    x = torch.randn(M, B, K, device=device)
    w = torch.rand(M, K, device=device) + 0.1
    s = torch.rand(M, device=device) + 0.5
    mask = torch.tensor([[1, 0, 1], [1, 1, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0]], dtype=torch.bool, device=device)
    g = torch.randn(B, K, device=device)
    want_z, want_dx = fuse_oracle(x, w, s, mask, None, g)

    def call():
        xx = x.detach().requires_grad_()
        z = mmkernels.decision_fuse(xx, w, s, mask)
        (dx,) = torch.autograd.grad(z, xx, g)
        return z, dx

    def check(got, what):
        assert_close(got[0], want_z, rtol=1e-5, atol=1e-6, what=what + " z")
        assert_close(got[1], want_dx, rtol=1e-5, atol=1e-6, what=what + " dx")

    n = _each_config(call, check)
    assert n >= 4  # forward and backward, chunks of 256, 512, 1024


@pytest.mark.parametrize("ndim,shape,cutoffs", [(1, (6, 300), [0.05, 0.2]), (2, (3, 20, 36), [0.1, 0.25])])
def test_band_energy_every_config(triton_backend, device, ndim, shape, cutoffs):
    x = torch.randn(*shape, device=device)
    g = torch.randn(shape[0], len(cutoffs) + 1, device=device)
    xd = x.double().requires_grad_()
    ref = (oracle_1d_diff if ndim == 1 else oracle_2d_diff)(xd, cutoffs)
    (want_gx,) = torch.autograd.grad(ref, xd, g.double())

    def call():
        xx = x.detach().requires_grad_()
        e = mmkernels.band_energy(xx, cutoffs, ndim=ndim)
        (gx,) = torch.autograd.grad(e, xx, g)
        return e, gx

    def check(got, what):
        assert_bands_close(got[0], ref.detach(), what)
        assert_close(got[1].double(), want_gx, rtol=1e-4, atol=1e-4 * float(want_gx.abs().max()), what=what + " grad")

    n = _each_config(call, check)
    assert n >= (8 if ndim == 1 else 6)


def test_band_energy_2d_images_per_program_tail(triton_backend, device):
    # 5 images with 4 per program: the last program redoes image 4 three times; results must not change.
    x = torch.randn(5, 12, 12, device=device)
    spaces = _space(lambda: mmkernels.band_energy(x, [0.2], ndim=2))
    cfg = dict(spaces["_band_energy_2d_fwd_kernel"][0], IMGS=4)
    with _tuning.forced("_band_energy_2d_fwd_kernel", cfg):
        got = mmkernels.band_energy(x, [0.2], ndim=2)
    assert_bands_close(got, oracle_2d_diff(x.double(), [0.2]), "IMGS=4 tail")


# ----------------------------------------------------------------------------------------- selection rules

def _scores_call(device):
    logits = torch.randn(2, 6, 40, device=device)
    labels = torch.randint(0, 40, (6,), device=device)
    return lambda: mmkernels.modality_scores(logits, labels)


SCORES_ARGS = (6, 40)  # the heuristic's arguments (B, K) of _scores_call


def test_heuristic_without_search_or_table(triton_backend, device):
    call = _scores_call(device)
    with _tuning.recording() as log:
        call()
    (name, key, heur, cands), = log
    assert name == "_modality_scores_fwd_kernel" and key[2] == torch.float32
    # select() returns the heuristic when nothing is forced, no search runs and (CPU) no table applies
    tunable = _tuning.registry()[name]
    assert tunable.select(key, SCORES_ARGS, lambda cfg: None, torch.device("cpu")).as_dict() == heur


def test_autotune_picks_fastest_and_caches(triton_backend, device, monkeypatch):
    call = _scores_call(device)
    with _tuning.recording() as log:
        call()
    (name, key, heur, cands), = log
    tunable = _tuning.registry()[name]
    assert len(cands) > 2
    fastest = len(cands) - 2  # pretend the second-to-last candidate is the fastest
    timed = []

    def fake_timer(fn):
        fn()
        timed.append(1)
        return 1.0 if len(timed) - 1 == fastest else 5.0 + len(timed)

    monkeypatch.setattr(_tuning, "_timer", fake_timer)
    monkeypatch.setattr(_tuning, "_autotuned", {})
    _tuning.set_autotune(True)
    try:
        launched = []
        pick = tunable.select(key, SCORES_ARGS, launched.append, torch.device(device))
        assert pick.as_dict() == cands[fastest]
        assert len(launched) == len(cands) and len(timed) == len(cands)
        # second launch: cached, no new search
        assert tunable.select(key, SCORES_ARGS, launched.append, torch.device(device)) == pick
        assert len(timed) == len(cands)
        # the op itself still gives the right answer through the search
        s, c = call()
        assert torch.isfinite(s).all()
    finally:
        _tuning.set_autotune(False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ToyConfig(_tuning.LaunchConfig):
    A: int


def _toy(name, heur=0, cands=(0,)):
    kernel = type(name, (), {"__name__": name})  # stands in for a @triton.jit function: only its name is used
    return _tuning.Tunable(kernel, _ToyConfig, lambda: _ToyConfig(A=heur), lambda: [_ToyConfig(A=a) for a in cands])


def test_autotune_skips_failing_configs_and_reports_when_none_runs(monkeypatch):
    monkeypatch.setattr(_tuning, "_autotuned", {})
    monkeypatch.setattr(_tuning, "_registry", {})

    def launch(cfg):
        if cfg.A != 3:
            raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(_tuning, "_timer", lambda fn: (fn(), 1.0)[1])
    _tuning.set_autotune(True)
    try:
        assert _toy("k", 1, (1, 2, 3)).select((1,), (), launch, torch.device("cpu")) == _ToyConfig(A=3)

        def never(cfg):
            raise RuntimeError("out of resources")

        with pytest.raises(RuntimeError, match="no candidate config of kernel 'k2'"):
            _toy("k2", 1, (1, 2, 3)).select((1,), (), never, torch.device("cpu"))
    finally:
        _tuning.set_autotune(False)


def test_forced_is_scoped_and_nests(monkeypatch):
    monkeypatch.setattr(_tuning, "_registry", {})
    cpu = torch.device("cpu")
    k, other = _toy("k"), _toy("other")
    with _tuning.forced("k", {"A": 1}):
        assert k.select((), (), None, cpu) == _ToyConfig(A=1)
        with _tuning.forced(k, _ToyConfig(A=2)):
            assert k.select((), (), None, cpu) == _ToyConfig(A=2)
        assert k.select((), (), None, cpu) == _ToyConfig(A=1)
        assert other.select((), (), None, cpu) == _ToyConfig(A=0)
    assert k.select((), (), None, cpu) == _ToyConfig(A=0)


def test_keys_and_table_names():
    assert _tuning.bucket(1) == 1 and _tuning.bucket(5) == 8 and _tuning.bucket(64) == 64 and _tuning.bucket(0) == 1
    assert _tuning.key_str((64, 2048, torch.bfloat16, (0.1, 0.2))) == "64|2048|bfloat16|(0.1, 0.2)"
    assert _tuning.table_path("NVIDIA H100 80GB HBM3").endswith("tuned/NVIDIA_H100_80GB_HBM3.json")


def test_shipped_tables_are_valid():
    """Every shipped table names kernels the package launches, with configs of the right parameter names."""
    import glob
    import os

    from mmkernels.ops import band_energy, decision_fuse, frm, modality_scores  # noqa: F401  (register kernels)

    known = _tuning.registry()
    assert {"_frm_fwd_kernel", "_modality_scores_fwd_kernel", "_decision_fuse_fwd_kernel",
            "_decision_fuse_bwd_kernel"} <= set(known)
    for path in glob.glob(os.path.join(os.path.dirname(_tuning.__file__), "tuned", "*.json")):
        with open(path) as f:
            data = json.load(f)
        assert {"device_name", "configs"} <= set(data), path
        for kernel, entries in data["configs"].items():
            assert kernel in known, (path, kernel)
            for key, cfg in entries.items():
                # the entry is a config of that kernel, field for field
                assert known[kernel].config.from_dict(cfg).as_dict() == cfg, (path, kernel, key, cfg)


@pytest.mark.gpu
def test_gpu_tuned_table_is_used(tmp_path, monkeypatch):
    name = torch.cuda.get_device_name(0)
    logits = torch.randn(2, 64, 1000, device="cuda")
    labels = torch.randint(0, 1000, (64,), device="cuda")
    with _tuning.recording() as log:
        mmkernels.modality_scores(logits, labels)
    (kernel, key, heur, cands), = log
    other = next(c for c in cands if c != heur)
    monkeypatch.setattr(_tuning, "_TUNED_DIR", str(tmp_path))
    monkeypatch.setattr(_tuning, "_tables", {})
    with open(_tuning.table_path(name), "w") as f:
        json.dump({"device_name": name, "configs": {kernel: {_tuning.key_str(key): other}}}, f)
    assert _tuning.registry()[kernel].select(key, (64, 1000), None, torch.device("cuda")).as_dict() == other
    s, c = mmkernels.modality_scores(logits, labels)
    want_s, want_c = scores_oracle(logits, labels)
    assert_close(s, want_s, rtol=1e-5, atol=1e-5, what="with tuned table")
    assert_close(c, want_c, rtol=0, atol=0, what="with tuned table")


# ----------------------------------------------------------------------------------------- the sweep (python -m mmkernels tune)

def test_tune_quick_sweep_records_every_candidate(tmp_path):
    from mmkernels.bench import tune

    assert tune.main(["--quick", "--device", "cpu", "--ops", "modality_scores", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "tuning" / "tuning_modality_scores_cpu.json") as f:
        data = json.load(f)
    rows = data["rows"]
    assert data["environment"]["device"] == "cpu"
    heur = [r for r in rows if r["heuristic"]]
    assert len(heur) == 1 and heur[0]["speedup_vs_heuristic"] == pytest.approx(1.0)
    assert len({r["config"] for r in rows}) == len(rows) > 3
    assert all(r["median_ms"] > 0 for r in rows)


def _row(kernel, key, case, cfg, ms, heuristic, base):
    return {"kernel": kernel, "key": key, "case": case, "cfg": cfg, "median_ms": ms, "heuristic": heuristic,
            "speedup_vs_heuristic": base / ms}


def test_best_configs_margin_and_table_merge(tmp_path):
    from mmkernels.bench.tune import best_configs, write_table

    rows = [
        _row("k", "a", "c1", {"X": 1}, 1.00, True, 1.00),
        _row("k", "a", "c1", {"X": 2}, 0.90, False, 1.00),   # 11 % faster: kept
        _row("k", "b", "c2", {"X": 1}, 1.00, True, 1.00),
        _row("k", "b", "c2", {"X": 2}, 0.99, False, 1.00),   # 1 % faster: within noise, heuristic stays
        _row("j", "a", "c3", {"Y": 1}, 2.00, True, 2.00),
        _row("j", "a", "c3", {"Y": 2}, 1.00, False, 2.00),
    ]
    table = best_configs(rows, margin=0.03)
    assert table == {"k": {"a": {"X": 2}, "b": None}, "j": {"a": {"Y": 2}}}
    path = str(tmp_path / "dev.json")
    write_table({"k": {"b": {"X": 9}, "old": {"X": 7}}}, "Dev", {}, path)  # an older sweep
    write_table(table, "Dev", {"date": "d"}, path)
    with open(path) as f:
        data = json.load(f)
    # "b" is dropped (the heuristic won this time), "old" (not swept now) kept, new entries added
    assert data["configs"] == {"k": {"a": {"X": 2}, "old": {"X": 7}}, "j": {"a": {"Y": 2}}}
    assert data["device_name"] == "Dev"


def test_static_resources_tool_compiles_for_sm90(tmp_path):
    """tools/static_resources.py compiles candidate configs for sm_90 on the CPU and reads their registers."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, os.path.join(root, "tools", "static_resources.py"), "--ops",
                          "decision_fuse", "--limit", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "resources_sm90.json") as f:
        rows = json.load(f)["rows"]
    assert {r["kernel"] for r in rows} == {"_decision_fuse_fwd_kernel", "_decision_fuse_bwd_kernel"}
    for r in rows:
        assert 0 < r["regs"] <= 255 and 0 < r["warps_per_sm"] <= 64, r
    assert sum(r["heuristic"] for r in rows) == 2


@pytest.mark.gpu
def test_gpu_autotune_search_runs_and_stays_correct(monkeypatch):
    monkeypatch.setattr(_tuning, "_autotuned", {})
    logits = torch.randn(2, 256, 1000, device="cuda")
    labels = torch.randint(0, 1000, (256,), device="cuda")
    want_s, want_c = scores_oracle(logits, labels)
    _tuning.set_autotune(True)
    try:
        s, c = mmkernels.modality_scores(logits, labels)
    finally:
        _tuning.set_autotune(False)
    assert [k[0] for k in _tuning._autotuned] == ["_modality_scores_fwd_kernel"]
    assert_close(s, want_s, rtol=1e-5, atol=1e-5, what="after the search")
    assert_close(c, want_c, rtol=0, atol=0, what="after the search")


# ----------------------------------------------------------------------------------------- typed configs

def test_typed_config_and_tunable_keyed_by_kernel_name(monkeypatch):
    import dataclasses

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Cfg(_tuning.LaunchConfig):
        BLOCK: int
        SPLIT: int = 1
        HOST = ("SPLIT",)

    def _toy_fwd_kernel():  # stands in for a @triton.jit function: only its name is used
        pass

    monkeypatch.setattr(_tuning, "_registry", {})
    t = _tuning.Tunable(_toy_fwd_kernel, Cfg, lambda n: Cfg(BLOCK=n, num_warps=2),
                        lambda n: [Cfg(BLOCK=b) for b in (n, 2 * n)])
    assert t.name == "_toy_fwd_kernel" and _tuning.registry() == {"_toy_fwd_kernel": t}
    cpu = torch.device("cpu")
    heur = t.select((8,), (8,), None, cpu)
    assert heur == Cfg(BLOCK=8, num_warps=2) and heur.meta == {"BLOCK": 8, "num_warps": 2}
    assert heur.as_dict() == {"BLOCK": 8, "SPLIT": 1, "num_warps": 2}  # num_stages=None: Triton's default
    with _tuning.recording() as log:
        t.select((8,), (8,), None, cpu)
    space = [heur.as_dict(), Cfg(BLOCK=8).as_dict(), Cfg(BLOCK=16).as_dict()]  # the heuristic is added first
    assert log == [("_toy_fwd_kernel", (8,), heur.as_dict(), space)]
    # forced by the kernel object, by its name, as a typed config or as a dict (what tools and tables hold)
    with _tuning.forced(_toy_fwd_kernel, {"BLOCK": 4, "SPLIT": 3}):
        got = t.select((8,), (8,), None, cpu)
        assert got == Cfg(BLOCK=4, SPLIT=3) and got.meta == {"BLOCK": 4, "num_warps": 4}
    with _tuning.forced("_toy_fwd_kernel", Cfg(BLOCK=32)):
        assert t.select((8,), (8,), None, cpu) == Cfg(BLOCK=32)
    with _tuning.forced(t, {"BLOCKK": 4}):
        with pytest.raises(ValueError, match=r"Cfg: unknown launch parameter\(s\) \['BLOCKK'\]"):
            t.select((8,), (8,), None, cpu)


def test_tune_sweeps_only_the_backward_kernels_of_a_fwd_bwd_case_with_a_forward_twin(monkeypatch):
    # the forward kernel of a "fwd+bwd" call is swept by its forward-only twin case already
    from mmkernels.bench import tune

    fwd, bwd = "_toy_fwd_kernel", "_toy_bwd_kernel"
    cands = [{"BLOCK": 8}, {"BLOCK": 16}]

    def call_fwd():
        for log in _tuning._recorders:
            log.append((fwd, (8,), cands[0], cands))

    def call_fwd_bwd():
        call_fwd()
        for log in _tuning._recorders:
            log.append((bwd, (8,), cands[0], cands))

    monkeypatch.setattr(tune, "_cases", lambda op, device, quick: [("toy 8 fwd", call_fwd),
                                                                   ("toy 8 fwd+bwd", call_fwd_bwd)])
    monkeypatch.setattr(tune, "time_fn", lambda call, device, quick: {"median_ms": 1.0})
    rows = tune.sweep(["toy"], "cpu", quick=True)
    swept = {(r["case"], r["kernel"]) for r in rows}
    assert swept == {("toy 8 fwd", fwd), ("toy 8 fwd+bwd", bwd)}
