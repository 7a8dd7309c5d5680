"""Shared test helpers (import as `from tests.helpers import assert_close`)."""
import torch


def assert_close(actual, expected, rtol, atol, what=""):
    """torch.testing.assert_close with the first mismatching elements printed on failure."""
    actual = actual.detach().cpu().to(expected.dtype)
    expected = expected.detach().cpu()
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        detail = ", ".join(f"{tuple(i)}: got {actual[tuple(i)].item():.6g} want {expected[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(f"{what} mismatch in {int(bad.sum())}/{bad.numel()} elements (rtol={rtol}, atol={atol}); first: {detail}")


def _rank_main(rank, world, port, out_dir, worker, args):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a small CPU: oversubscribed threads only slow them down
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_on_ranks(worker, *args, world: int = 2) -> list:
    """Run ``worker(rank, world, *args)`` in ``world`` spawned CPU processes inside one gloo process group;
    returns what each rank's call returned (saved with torch.save), in rank order. ``worker`` must be a
    module-level function (spawn pickles it)."""
    import os
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank_main, args=(world, port, out_dir, worker, args), nprocs=world, join=True,
                           start_method="spawn")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]


def assert_raises_each(cases):
    """``cases``: ``(call, exception type, regex the message must match)``; every call must raise."""
    import pytest

    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def select_backend(name: str, device, kernel: str, what: str):
    """Body of an op's ``backend`` fixture: tests/conftest.py's backends plus ``"cpu-kernel"``, i.e. backend
    "auto" on CPU tensors, which runs the extension's C++ kernel ``mmkernels_C::<kernel>`` (skipped when it is
    not built, or when tests run on CUDA). Use as ``yield from select_backend(request.param, device, ...)``."""
    import pytest

    import mmkernels
    from mmkernels import _ext

    backend = name
    if name == "cpu-kernel":
        if device != "cpu" or not _ext.has_kernel(kernel, "cpu"):
            pytest.skip(f"no C++ CPU kernel for {what} here ({_ext.why_missing() or 'tests run on ' + device})")
        backend = "auto"
    with mmkernels.use_backend(backend):
        yield name


def run_script(script: str, env: dict, expect: str, unset: tuple = ()) -> None:
    """Run ``script`` in a fresh interpreter from the repository root with ``env`` added to the environment
    (settings the extension reads once per process), the variables in ``unset`` removed, and the cached build
    only; it must print ``expect``."""
    import os
    import subprocess
    import sys

    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(MMKERNELS_JIT="0", **env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], cwd=root, env=full, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and expect in out.stdout, out.stderr[-3000:]


def run_portable_kernels(script: str, forced: str = "MMKERNELS_NO_AVX2") -> None:
    """Run ``script`` with the extension's loops for a lesser CPU forced (the choice is made once per process):
    ``MMKERNELS_NO_AVX2`` the portable loops, ``MMKERNELS_NO_AVX512`` the AVX2 ones where a kernel has AVX-512
    versions. It must print "portable ok"."""
    run_script(script, {forced: "1"}, "portable ok")
