"""One module per operator, every one laid out the same way (docs/contributing.md): 1. module-level
``@triton.jit`` kernels ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel``, 2. the launch config (a typed
:class:`mmkernels._tuning.LaunchConfig`, a heuristic and candidates in a :class:`mmkernels._tuning.Tunable`
keyed by the kernel's name), 3. launchers, 4. ``<op>_ref``, 5. the ``torch.library`` registration,
6. the public function (all validation, then dispatch). Op modules take ``triton`` and ``tl`` from
:mod:`mmkernels._triton` (a stand-in where triton is not installed); ``import mmkernels`` imports them
lazily."""
