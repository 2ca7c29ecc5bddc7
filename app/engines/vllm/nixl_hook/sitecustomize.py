"""Loaded by every Python process of a NIXL engine (its folder is put first on PYTHONPATH).

NIXL's Python agent hard-codes its UCX progress thread's poll timeout to 0 (`pthrDelay = 0`), so
that thread spins a whole core per engine even when idle. Measured on a 2-core box with one
prefill and one decode vLLM CPU server: both cores went to the two spinning threads, the split hop
took 0.3-0.5 s at p50 with 30 s stalls, and requests timed out. The thread wakes on UCX's event fds
anyway; the timeout is only NIXL's periodic safety wake-up. This sets it to
GATEWAY_NIXL_PROGRESS_DELAY_US (microseconds, rounded up to milliseconds by NIXL) when NIXL's
bindings are imported, and leaves everything else alone.
"""

import importlib.abc
import importlib.machinery
import os
import runpy
import sys

_BINDINGS = ("nixl_cu12._bindings", "nixl_cu13._bindings", "nixl_rocm._bindings", "nixl._bindings")


def _patch_bindings(module: object, delay_us: int) -> None:
    base = module.nixlAgentConfig  # type: ignore[attr-defined]

    class AgentConfig(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: object) -> None:
            if name == "pthrDelay" and value == 0:
                value = delay_us
            super().__setattr__(name, value)

    module.nixlAgentConfig = AgentConfig  # type: ignore[attr-defined]


class _ProgressDelayFinder(importlib.abc.MetaPathFinder):
    def __init__(self, delay_us: int) -> None:
        self._delay_us = delay_us

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in _BINDINGS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module
        delay_us = self._delay_us

        def exec_module(module):  # type: ignore[no-untyped-def]
            load(module)
            _patch_bindings(module, delay_us)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _install() -> None:
    delay = os.environ.get("GATEWAY_NIXL_PROGRESS_DELAY_US", "")
    if delay.isdigit() and int(delay) > 0:
        sys.meta_path.insert(0, _ProgressDelayFinder(int(delay)))


def _run_shadowed_sitecustomize() -> None:
    # Being first on PYTHONPATH hides any sitecustomize the environment already had: run it too.
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or ".")
        candidate = os.path.join(folder, "sitecustomize.py")
        if folder != here and os.path.isfile(candidate):
            runpy.run_path(candidate, run_name="sitecustomize")
            return


_install()
_run_shadowed_sitecustomize()
