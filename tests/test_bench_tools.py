"""The benchmark tooling: interleaved repeats and their spread, L2-warm rows, target selection, tables,
plots and the results files. Timings here come from fake callables of known cost, not from kernels."""
import csv
import json
import os
import time

import pytest
import torch

from mmkernels.bench import harness, report


def _busy(ms: float, log: list, name: str):
    def fn():
        log.append(name)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < ms * 1e-3:
            pass
    return fn


def _runs(log: list) -> list:
    """The log with consecutive repeats collapsed: which implementation ran, in what order."""
    return [name for i, name in enumerate(log) if i == 0 or log[i - 1] != name]


def test_measure_repeats_interleave_and_ratio_on_cpu():
    log = []
    impls = {"slow": _busy(2.0, log, "slow"), "fast": _busy(1.0, log, "fast")}
    rows = harness.measure("fake", "n=1", impls, "cpu", baseline="slow", quick=True, repeats=3)
    assert _runs(log) == ["slow", "fast"] * 3
    by = {r["impl"]: r for r in rows}
    assert set(by) == {"slow", "fast"}
    # 2 ms against 1 ms of busy waiting: the ratio is 2 up to timer and loop overhead
    assert 1.6 < by["fast"]["speedup_vs_slow"] < 2.4
    assert by["slow"]["speedup_vs_slow"] == 1.0
    assert 1.8 < by["slow"]["median_ms"] < 2.6
    for r in rows:
        assert r["repeats"] == 3
        assert r["spread_pct"] >= 0
        assert "l2" not in r  # the CPU has no flush: no L2 column
        assert r["q20_ms"] <= r["median_ms"] <= r["q80_ms"]


def test_measure_single_repeat_has_no_spread():
    log = []
    rows = harness.measure("fake", "n=1", {"a": _busy(0.2, log, "a")}, "cpu", baseline="a", quick=True)
    assert "spread_pct" not in rows[0] and "repeats" not in rows[0]
    assert rows[0]["median_ms"] > 0


def _scripted_time_fn(script: dict, order: list):
    """A stand-in for ``harness.time_fn`` returning scripted medians per (impl, l2), in turn."""
    counters = {}

    def fake(fn, device, quick=False, l2="cold"):
        name = fn()
        order.append((name, l2))
        i = counters.get((name, l2), 0)
        counters[(name, l2)] = i + 1
        m = script[(name, l2)][i]
        return {"median_ms": m, "q20_ms": 0.9 * m, "q80_ms": 1.1 * m}
    return fake


def test_measure_aggregates_repeats(monkeypatch):
    order = []
    script = {("a", "cold"): [1.0, 3.0, 2.0], ("b", "cold"): [0.5, 0.5, 1.0]}
    monkeypatch.setattr(harness, "time_fn", _scripted_time_fn(script, order))
    rows = harness.measure("fake", "s", {"a": lambda: "a", "b": lambda: "b"}, "cpu", baseline="a",
                           repeats=3, nbytes=10**9)
    assert [n for n, _ in order] == ["a", "b", "a", "b", "a", "b"]
    a, b = rows
    assert a["median_ms"] == pytest.approx(2.0) and b["median_ms"] == pytest.approx(0.5)
    assert a["spread_pct"] == pytest.approx(100.0)  # (3 - 1) / 2
    assert b["spread_pct"] == pytest.approx(100.0)  # (1 - 0.5) / 0.5
    assert a["q20_ms"] == pytest.approx(1.8) and b["q80_ms"] == pytest.approx(0.55)
    assert b["speedup_vs_a"] == pytest.approx(4.0)  # from the reported medians
    assert b["gbps"] == pytest.approx(2000.0)  # 1 GB in 0.5 ms


def test_measure_cold_and_warm_rows_on_cuda(monkeypatch):
    order = []
    script = {("a", "cold"): [4.0, 4.0], ("b", "cold"): [2.0, 2.0],
              ("a", "warm"): [3.0, 3.0], ("b", "warm"): [0.5, 0.5]}
    monkeypatch.setattr(harness, "time_fn", _scripted_time_fn(script, order))
    monkeypatch.setattr(harness, "peak_gbps", lambda device: None)
    rows = harness.measure("fake", "s", {"a": lambda: "a", "b": lambda: "b"}, "cuda", baseline="a",
                           repeats=2, l2=("cold", "warm"))
    assert order == [("a", "cold"), ("b", "cold"), ("a", "warm"), ("b", "warm")] * 2
    got = {(r["impl"], r["l2"]): r for r in rows}
    assert set(got) == {("a", "cold"), ("b", "cold"), ("a", "warm"), ("b", "warm")}
    # ratios are taken within one L2 state
    assert got[("b", "cold")]["speedup_vs_a"] == pytest.approx(2.0)
    assert got[("b", "warm")]["speedup_vs_a"] == pytest.approx(6.0)
    assert got[("a", "warm")]["spread_pct"] == pytest.approx(0.0)
    # default on CUDA: cold rows only, still marked
    order.clear()
    monkeypatch.setattr(harness, "time_fn", _scripted_time_fn(script, order))
    rows = harness.measure("fake", "s", {"a": lambda: "a"}, "cuda", baseline="a")
    assert [r["l2"] for r in rows] == ["cold"] and order == [("a", "cold")]


def test_measure_failing_impl_is_recorded_once():
    log = []

    def broken():
        log.append("broken")
        raise RuntimeError("no kernel")

    rows = harness.measure("fake", "s", {"ok": _busy(0.1, log, "ok"), "broken": broken}, "cpu",
                           baseline="broken", quick=True, repeats=3)
    ok, bad = rows
    assert bad["median_ms"] is None and bad["error"].startswith("RuntimeError")
    assert log.count("broken") == 1  # not called again after it raised
    assert not any(k.startswith("speedup") for k in ok)  # no baseline figure, no ratio


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        harness.time_fn(lambda: None, "cpu", l2="lukewarm")
    with pytest.raises(ValueError):
        harness.measure("f", "s", {"a": lambda: None}, "cpu", baseline="a", repeats=0)
    with pytest.raises(ValueError):
        harness.measure("f", "s", {"a": lambda: None}, "cpu", baseline="a", l2=("hot",))


def _write(path, env, rows):
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f)


CUDA_ENV = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "2.11.0+cu130", "triton": "3.6.0",
            "cuda": "13.0", "driver": "1", "date": "2026-11-22T19:00:00"}


def test_target_selects_cold_row_when_warm_rows_exist(tmp_path):
    shape, impl = "64x3x112x112", "mmkernels.frm"
    rows = [  # the warm row comes first, so a selection that ignored l2 would take it
        {"op": "frm", "shape": shape, "impl": impl, "l2": "warm", "median_ms": 0.01, "speedup_vs_released_mwam": 99.5},
        {"op": "frm", "shape": shape, "impl": impl, "l2": "cold", "median_ms": 0.03, "speedup_vs_released_mwam": 31.25},
    ]
    _write(tmp_path / "frm_cuda_NVIDIA_H100_80GB_HBM3.json", CUDA_ENV, rows)
    text = report.targets(str(tmp_path))
    frm_lines = [line for line in text.splitlines() if "| frm | 64x3x112x112 |" in line]
    assert len(frm_lines) == 1
    assert "| 31.25 | yes |" in frm_lines[0] and "99.50" not in text
    # rows recorded before the l2 column existed are still selected
    rows[1].pop("l2")
    _write(tmp_path / "frm_cuda_NVIDIA_H100_80GB_HBM3.json", CUDA_ENV, rows)
    assert "| 31.25 | yes |" in report.targets(str(tmp_path))


FAKE_ROWS = [
    {"op": "toy", "shape": "8x8", "impl": "eager", "dtype": "float32", "median_ms": 4.0, "q20_ms": 3.9, "q80_ms": 4.1,
     "l2": "cold", "speedup_vs_eager": 1.0},
    {"op": "toy", "shape": "8x8", "impl": "mmkernels.toy", "dtype": "float32", "median_ms": 1.0, "q20_ms": 0.9,
     "q80_ms": 1.1, "l2": "cold", "spread_pct": 12.5, "speedup_vs_eager": 4.0},
    {"op": "toy", "shape": "8x8", "impl": "eager", "dtype": "float32", "median_ms": 2.0, "q20_ms": 1.9, "q80_ms": 2.1,
     "l2": "warm", "speedup_vs_eager": 1.0},
    {"op": "toy", "shape": "8x8", "impl": "mmkernels.toy", "dtype": "float32", "median_ms": 0.25, "q20_ms": 0.2,
     "q80_ms": 0.3, "l2": "warm", "speedup_vs_eager": 8.0},
    {"op": "toy", "shape": "16x16", "impl": "mmkernels.toy", "dtype": "float32", "median_ms": None, "error": "boom"},
]


def test_speedup_panels_follow_the_rows():
    panels = report.speedup_panels(FAKE_ROWS)
    assert panels == [("eager", [("8x8", "mmkernels.toy", 4.0), ("8x8 L2 warm", "mmkernels.toy", 8.0)])]
    assert report.speedup_panels([{"impl": "a", "median_ms": 1.0}]) == []


def test_plots_and_tables_link_them(tmp_path):
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    _write(results / "toy_cuda_X.json", CUDA_ENV, FAKE_ROWS)
    _write(results / "steps_cpu.json", {"device": "cpu", "device_name": "x86_64"},
           [{"op": "step", "shape": "B=1", "impl": "baseline", "median_ms": 1.0, "overhead_pct": 0.0}])
    written = report.plots(str(results))
    png = results / "plots" / "toy_cuda_X.png"
    assert written == [str(png)]  # the file without speedup columns gets no plot
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(str(png))
    assert img.shape[0] > 100 and img.shape[1] > 100

    text = report.tables(str(results), link_from=str(tmp_path))
    assert "(benchmarks/results/plots/toy_cuda_X.png)" in text
    assert "steps_cpu.png" not in text
    toy = text.split("<b>toy_cuda_X.json</b>")[1].split("</details>")[0]
    assert toy.index("plots/toy_cuda_X.png") < toy.index("| op |")  # the link sits inside the block
    assert "| L2 |" in toy and "| spread % |" in toy
    assert "| toy | 8x8 | float32 | mmkernels.toy | warm | 0.2500 |" in toy
    assert "| 12.5 |" in toy

    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\n{report.BEGIN}\nSTALE TABLE\n{report.END}\ntail\n")
    os.remove(png)
    cwd = os.getcwd()
    os.chdir(tmp_path / "benchmarks")  # the link is relative to the README, not to the working directory
    try:
        report.update_readme(str(readme), str(results))
    finally:
        os.chdir(cwd)
    out = readme.read_text()
    assert png.exists()  # regenerated
    assert "](benchmarks/results/plots/toy_cuda_X.png)" in out
    assert "STALE TABLE" not in out and out.endswith("tail\n")


def test_write_results_round_trip(tmp_path):
    rows = [
        {"op": "toy", "shape": "8x8", "impl": "a", "device": "cpu", "median_ms": 2.0, "q20_ms": 1.5, "q80_ms": 2.5,
         "speedup_vs_a": 1.0},
        {"op": "toy", "shape": "8x8", "impl": "b", "device": "cpu", "median_ms": None, "q20_ms": None, "q80_ms": None,
         "error": "ValueError: x"},
    ]
    path = harness.write_results("toy", rows, "cpu", out_dir=str(tmp_path))
    assert path == os.path.join(str(tmp_path), "toy_cpu.json")
    with open(path) as f:
        data = json.load(f)
    assert data["rows"] == rows
    env = data["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["date"]
    with open(os.path.join(str(tmp_path), "toy_cpu.csv"), newline="") as f:
        got = list(csv.DictReader(f))
    assert [r["impl"] for r in got] == ["a", "b"]
    assert set(list(got[0])[:3]) == {"op", "shape", "impl"}  # identifying columns first
    assert float(got[0]["median_ms"]) == 2.0 and got[1]["median_ms"] == "" and got[1]["error"] == "ValueError: x"
    assert got[0]["error"] == "" and float(got[0]["speedup_vs_a"]) == 1.0


@pytest.mark.gpu
def test_l2_warm_and_cold_timing_on_cuda():
    x = torch.empty(16 * 1024 * 1024, device="cuda")  # 64 MB, float32
    y = torch.empty_like(x)

    def copy():
        y.copy_(x)

    cold = harness.time_fn(copy, "cuda", quick=True, l2="cold")
    warm = harness.time_fn(copy, "cuda", quick=True, l2="warm")
    for t in (cold, warm):
        assert 0 < t["q20_ms"] <= t["median_ms"] <= t["q80_ms"]
    assert warm["median_ms"] <= 2 * cold["median_ms"]
    # 128 MB moved in each call: below 20 TB/s on any device we know, so both are real timings
    assert warm["median_ms"] > 128e6 / 20e12 * 1e3
    rows = harness.measure("copy", "64MB", {"copy": copy}, "cuda", baseline="copy", quick=True, l2=("cold", "warm"))
    assert [r["l2"] for r in rows] == ["cold", "warm"]


def test_time_interleaved_rotates_and_combines():
    from mmkernels.bench.harness import time_interleaved

    log = []

    def make(name, seconds):
        def fn():
            log.append(name)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                pass
        return fn

    out = time_interleaved({"fast": make("fast", 0.0005), "slow": make("slow", 0.002)}, "cpu", quick=True, repeats=3)
    assert set(out) == {"fast", "slow"}
    assert out["fast"]["repeats"] == 3 and out["fast"]["spread_pct"] >= 0
    assert 2.0 < out["slow"]["median_ms"] / out["fast"]["median_ms"] < 8.0
    # rotating order: the calls of one repeat of "fast" come before that repeat's "slow" calls, three times
    changes = sum(1 for a, b in zip(log, log[1:]) if a != b)
    assert changes == 5
