"""pytest-benchmark entries for band_energy, from the cases and implementations of ``benchmarks/band_energy.py``:
``pytest benchmarks/test_bench_band_energy.py --benchmark-only``."""
from benchmarks import band_energy as spec
from benchmarks.conftest import impl_of, parametrize


def pytest_generate_tests(metafunc):
    parametrize(metafunc, spec)


def test_band_energy(bench_call, case, impl):
    bench_call(impl_of(spec, case, impl))
