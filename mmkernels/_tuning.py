"""Launch configurations of the Triton kernels.

A *config* is a typed, frozen :class:`LaunchConfig` of one kernel: a subclass per kernel whose fields are the
kernel's ``tl.constexpr`` tile sizes plus ``num_warps`` / ``num_stages`` and, for some kernels, host-side
splits (such as programs per SM, listed in ``HOST``: used by the launcher, not passed to the kernel). Every
kernel has a :class:`Tunable`: its config class, a *heuristic* config computed from the shape, and a short list
of *candidates* around it. The tuning key of a kernel is its own name (the ``@triton.jit`` function's
``__name__``), so forced configs, the search cache and the tables need no lookup table. Which config a launch
uses, in order of precedence:

1. :func:`forced` — a context manager that pins one kernel's config (tests run every candidate through it;
   the tuner ``mmkernels/bench/tune.py``, ``python -m mmkernels tune``, times every candidate through it).
2. ``MMKERNELS_AUTOTUNE=1`` on a CUDA device: the first launch of a (kernel, key) times every candidate with
   ``triton.testing.do_bench`` and keeps the fastest for the rest of the process. Never while a CUDA graph is
   being captured (the heuristic or table is used then). The kernels write fresh outputs (no accumulation into
   user memory), so launching a candidate more than once is harmless.
3. A tuned table, ``mmkernels/tuned/<device name>.json``, written by the tuner from a recorded sweep on that
   device: ``{"configs": {kernel name: {key: config as a JSON object}}}``.
4. The heuristic.

A *key* is a short tuple chosen by the op (shape buckets and dtype), so a table carries over to nearby shapes.
Configs cross the tool boundary (:func:`recording`, :func:`forced`, the tables) as plain dicts of their fields;
:meth:`LaunchConfig.from_dict` turns one back into the typed config and rejects unknown field names.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Callable, ClassVar, Optional

import torch

__all__ = ["LaunchConfig", "Tunable", "kernel_name", "registry", "forced", "recording",
           "autotune_enabled", "set_autotune", "bucket", "key_str", "cfg_str", "table_path"]

_TUNED_DIR = os.path.join(os.path.dirname(__file__), "tuned")

_forced: dict[str, Any] = {}
_autotuned: dict[tuple, Any] = {}
_tables: dict[int, dict] = {}
_recorders: list[list] = []
_registry: dict[str, "Tunable"] = {}
_timer: Callable | None = None  # tests replace the CUDA timer; None = triton.testing.do_bench


_autotune_on = os.environ.get("MMKERNELS_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_enabled() -> bool:
    """``MMKERNELS_AUTOTUNE=1`` (read at import) or :func:`set_autotune`."""
    return _autotune_on


def set_autotune(on: bool) -> None:
    global _autotune_on
    _autotune_on = bool(on)


# --------------------------------------------------------------------------------------------------------
# Typed configs
# --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class LaunchConfig:
    """Base of every kernel's launch config. A subclass (also ``@dataclass(frozen=True, kw_only=True)``) adds
    the kernel's ``tl.constexpr`` tile sizes under their kernel parameter names, and names its host-side
    fields in ``HOST``. ``num_stages=None`` leaves Triton's default (and is omitted from :meth:`as_dict`)."""

    num_warps: int = 4
    num_stages: Optional[int] = None
    HOST: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "LaunchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown launch parameter(s) {unknown}; expected a subset of "
                             f"{sorted(names)}")
        return cls(**d)

    def as_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if out["num_stages"] is None:
            del out["num_stages"]
        return out

    @functools.cached_property
    def meta(self) -> dict:
        """Keyword arguments of the launch, ``kernel[grid](..., **cfg.meta)``: every field but the host ones."""
        return {k: v for k, v in self.as_dict().items() if k not in self.HOST}


def _as_dict(cfg) -> dict:
    return cfg.as_dict() if isinstance(cfg, LaunchConfig) else dict(cfg)


def kernel_name(kernel) -> str:
    """The tuning key of a kernel: the ``@triton.jit`` function's own name (a string passes through)."""
    if isinstance(kernel, str):
        return kernel
    if isinstance(kernel, Tunable):
        return kernel.name
    return kernel.__name__


@functools.lru_cache(maxsize=1024)  # called on every launch; the result is never mutated
def key_str(key: tuple) -> str:
    return "|".join(str(k).replace("torch.", "") for k in key)


def cfg_str(cfg) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(_as_dict(cfg).items()))


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
def forced(kernel, cfg):
    """Pin ``kernel`` (a kernel, its :class:`Tunable` or its name) to ``cfg`` (a config or a dict of its
    fields) for every key inside the block."""
    name = kernel_name(kernel)
    previous = _forced.get(name)
    _forced[name] = cfg if isinstance(cfg, LaunchConfig) else dict(cfg)
    try:
        yield
    finally:
        if previous is None:
            _forced.pop(name, None)
        else:
            _forced[name] = previous


@contextlib.contextmanager
def recording():
    """Collect ``(name, key, heuristic, candidates)`` of every launch-config choice inside the block, the
    configs as dicts of their fields (what :func:`forced` takes and the tables store)."""
    log: list = []
    _recorders.append(log)
    try:
        yield log
    finally:
        _recorders.remove(log)


def _unique(cfgs: list) -> list:
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


def _autotune(name: str, key: tuple, candidates: list, launch: Callable) -> Any:
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


def _choose(name: str, key: tuple, heuristic, candidates: Callable[[], list], launch: Callable,
            device: torch.device, convert: Callable):
    """The precedence of the module docstring; ``convert`` turns a forced or table entry into the caller's
    config type. Without a forced config, a search or a table this costs a dict lookup."""
    if _recorders:
        space = _unique([heuristic] + list(candidates()))
        for log in _recorders:
            log.append((name, key, _as_dict(heuristic), [_as_dict(c) for c in space]))
    if _forced and name in _forced:
        return convert(_forced[name])
    on_cuda = device.type == "cuda"
    if _autotune_on:
        # A search needs a real device (never while a CUDA graph is captured) or the tests' fake timer.
        if (on_cuda and not torch.cuda.is_current_stream_capturing()) or _timer is not None:
            k = (name, key, str(device))
            best = _autotuned.get(k)
            if best is None:
                best = _autotuned[k] = _autotune(name, key, _unique([heuristic] + list(candidates())), launch)
            return convert(best)
    if on_cuda:
        tuned = _table(device).get(name)
        if tuned:
            ks = key_str(key)
            cfg = tuned.get(ks)
            if cfg is not None:
                return convert(cfg)
    return heuristic


class Tunable:
    """The launch-config space of one Triton kernel: its typed config class, its heuristic and its candidates.

    ``heuristic(*args)`` returns the config for a shape (cached: launchers call it on every launch);
    ``candidates(*args)`` lists the search space (the heuristic is added when missing). The tuning key is
    :func:`kernel_name` of ``kernel``; every Tunable is listed in :func:`registry`."""

    def __init__(self, kernel, config: type[LaunchConfig], heuristic: Callable[..., LaunchConfig],
                 candidates: Callable[..., list[LaunchConfig]]):
        self.kernel = kernel
        self.name = kernel_name(kernel)
        self.config = config
        self.heuristic = functools.lru_cache(maxsize=1024)(heuristic)
        self.candidates = candidates
        _registry[self.name] = self

    def _convert(self, cfg) -> LaunchConfig:
        if isinstance(cfg, self.config):
            return cfg
        if isinstance(cfg, LaunchConfig):
            raise TypeError(f"kernel {self.name!r} takes a {self.config.__name__}, got a {type(cfg).__name__}")
        return self.config.from_dict(cfg)

    def select(self, key: tuple, args: tuple, launch: Callable[[LaunchConfig], None],
               device: torch.device) -> LaunchConfig:
        """The config this kernel launches with for ``key``; ``args`` are the heuristic's and candidates'
        arguments, ``launch(cfg)`` runs the kernel with ``cfg`` (a search calls it several times)."""
        return _choose(self.name, key, self.heuristic(*args), lambda: self.candidates(*args), launch, device,
                       self._convert)

    def __repr__(self) -> str:
        return f"Tunable({self.name}, {self.config.__name__})"


def registry() -> dict[str, Tunable]:
    """Every :class:`Tunable` of the op modules imported so far, by kernel name."""
    return dict(_registry)


def bucket(n: int) -> int:
    """Next power of two (at least 1): the shape bucket used in keys."""
    n = max(1, int(n))
    return 1 << (n - 1).bit_length()
