"""Launch configurations of the Triton kernels.

A *config* is a dict of one kernel's launch meta-parameters: its ``tl.constexpr`` tile sizes plus
``num_warps`` / ``num_stages`` (and, for some kernels, a host-side split such as programs per SM). Every
kernel has a *heuristic* config computed from the shape, and a short list of *candidates* around it. Which
one a launch uses, in order of precedence:

1. :func:`forced` — a context manager that pins one kernel's config (tests run every candidate through it;
   ``tools/tune.py`` times every candidate through it).
2. ``MMKERNELS_AUTOTUNE=1`` on a CUDA device: the first launch of a (kernel, key) times every candidate with
   ``triton.testing.do_bench`` and keeps the fastest for the rest of the process. Never while a CUDA graph is
   being captured (the heuristic or table is used then). The kernels write fresh outputs (no accumulation into
   user memory), so launching a candidate more than once is harmless.
3. A tuned table, ``mmkernels/tuned/<device name>.json``, written by ``tools/tune.py`` from a recorded sweep
   on that device: ``{kernel: {key: config}}``.
4. The heuristic.

A *key* is a short tuple chosen by the op (shape buckets and dtype), so a table carries over to nearby shapes.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
from typing import Callable

import torch

__all__ = ["select", "forced", "recording", "autotune_enabled", "set_autotune", "bucket", "key_str", "table_path"]

_TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")

_forced: dict[str, dict] = {}
_autotuned: dict[tuple, dict] = {}
_tables: dict[int, dict] = {}
_recorders: list[list] = []
_timer: Callable | None = None  # tests replace the CUDA timer; None = triton.testing.do_bench


_autotune_on = os.environ.get("MMKERNELS_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """``MMKERNELS_AUTOTUNE=1`` (read at import) or :func:`set_autotune`."""
    return _autotune_on


def set_autotune(on: bool) -> None:
    global _autotune_on
    _autotune_on = bool(on)


@functools.lru_cache(maxsize=1024)  # called on every launch; the result is never mutated
def key_str(key: tuple) -> str:
    return "|".join(str(k).replace("torch.", "") for k in key)


def cfg_str(cfg: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(cfg.items()))


def table_path(device_name: str) -> str:
    return os.path.join(_TUNED_DIR, re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def _table(device: torch.device) -> dict:
    """The tuned table of this CUDA device (``{}`` when none was recorded), loaded once per device index."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    table = _tables.get(idx)
    if table is None:
        path = table_path(torch.cuda.get_device_name(idx))
        table = {}
        if os.path.exists(path):
            with open(path) as f:
                table = json.load(f).get("configs", {})
        _tables[idx] = table
    return table


@contextlib.contextmanager
def forced(name: str, cfg: dict):
    """Pin kernel ``name`` to ``cfg`` (every key) inside the block."""
    previous = _forced.get(name)
    _forced[name] = dict(cfg)
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(name, None)
        else:
            _forced[name] = previous


@contextlib.contextmanager
def recording():
    """Collect ``(name, key, heuristic, candidates)`` of every :func:`select` call inside the block."""
    log: list = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def _unique(cfgs: list[dict]) -> list[dict]:
    seen, out = set(), []
    for c in cfgs:
        s = cfg_str(c)
        if s not in seen:
            seen.add(s)
            out.append(c)
    return out


def _time_ms(fn: Callable[[], None]) -> float:
    if _timer is not None:
        return _timer(fn)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=20)


def _autotune(name: str, key: tuple, candidates: list[dict], launch: Callable[[dict], None]) -> dict:
    best, best_ms = None, math.inf
    for cfg in candidates:
        try:
            ms = _time_ms(lambda cfg=cfg: launch(cfg))
        except Exception:  # noqa: BLE001 - a config the device cannot run (shared memory, registers) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    if best is None:
        raise RuntimeError(f"mmkernels autotune: no candidate config of kernel {name!r} ran for key {key_str(key)}")
    return best


def select(name: str, key: tuple, heuristic: dict, candidates: Callable[[], list[dict]],
           launch: Callable[[dict], None], device: torch.device) -> dict:
    """The config kernel ``name`` launches with for ``key`` (see the module docstring for the precedence).

    ``candidates()`` lists the search space (called only when searching or recording; the heuristic is added
    when missing). ``launch(cfg)`` runs the kernel with ``cfg``; a search calls it several times. Without a
    forced config, a search or a table this costs a dict lookup: ops call it on every launch."""
    if _recorders:
        space = _unique([heuristic] + list(candidates()))
        for log in _recorders:
            log.append((name, key, dict(heuristic), [dict(c) for c in space]))
    if _forced and name in _forced:
        return _forced[name]
    on_cuda = device.type == "cuda"
    if _autotune_on:
        # A search needs a real device (never while a CUDA graph is captured) or the tests' fake timer.
        if (on_cuda and not torch.cuda.is_current_stream_capturing()) or _timer is not None:
            k = (name, key, str(device))
            best = _autotuned.get(k)
            if best is None:
                best = _autotuned[k] = _autotune(name, key, _unique([heuristic] + list(candidates())), launch)
            return best
    if on_cuda:
        tuned = _table(device).get(name)
        if tuned:
            cfg = tuned.get(key_str(key))
            if cfg is not None:
                return cfg
    return heuristic


def bucket(n: int) -> int:
    """Next power of two (at least 1): the shape bucket used in keys."""
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()
