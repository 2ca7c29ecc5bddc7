"""Loaded by every Python process of a vLLM engine whose folder is put first on PYTHONPATH.

Two busy loops that cost nothing on a GPU node but starve a small CPU box, each replaced only when
its environment variable is set (the gateway sets them for CPU engines):

- NIXL's Python agent hard-codes its UCX progress thread's poll timeout to 0 (`pthrDelay = 0`), so
  that thread spins a whole core per engine even when idle. Measured on a 2-core box with one
  prefill and one decode vLLM CPU server: both cores went to the two spinning threads, the split
  hop took 0.3-0.5 s at p50 with 30 s stalls. The thread wakes on UCX's event fds anyway; the
  timeout is only NIXL's periodic safety wake-up. GATEWAY_NIXL_PROGRESS_DELAY_US sets it
  (microseconds, rounded up to milliseconds by NIXL).
- vLLM's engine core and its worker process pass every step through a shared-memory queue, and a
  reader waiting on it spins on `sched_yield()` for a second after each message. That keeps a core
  busy per waiting process, and it starves other threads of the same process of the GIL: measured
  on 2 cores, NIXL's handshake thread in the decode worker could not finish while a request waited
  for its KV cache, so the first split waited out vLLM's 30 s KV lease, and later decodes stalled
  for a second at a time. GATEWAY_SHM_POLL_SLEEP_US makes the reader sleep that long per check
  instead. vLLM's wake-up protocol is untouched: only the cost of a check changes.

A module that is missing or shaped differently (another vLLM or NIXL version) is left alone.
"""

import importlib.abc
import importlib.machinery
import os
import runpy
import sys
import time
from collections.abc import Callable

_NIXL_BINDINGS = ("nixl_cu12._bindings", "nixl_cu13._bindings", "nixl_rocm._bindings", "nixl._bindings")
_SHM_QUEUE = "vllm.distributed.device_communicators.shm_broadcast"


def _set_nixl_progress_delay(module: object, delay_us: int) -> None:
    base = getattr(module, "nixlAgentConfig", None)
    if base is None:
        return

    class AgentConfig(base):  # type: ignore[misc, valid-type]
        def __setattr__(self, name: str, value: object) -> None:
            if name == "pthrDelay" and value == 0:
                value = delay_us
            super().__setattr__(name, value)

    module.nixlAgentConfig = AgentConfig  # type: ignore[attr-defined]


def _sleep_between_queue_checks(module: object, sleep_us: int) -> None:
    if not callable(getattr(module, "sched_yield", None)):
        return
    seconds = sleep_us / 1e6

    def pause() -> None:
        time.sleep(seconds)

    module.sched_yield = pause  # type: ignore[attr-defined]


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def __init__(self, patches: dict[str, Callable[[object], None]]) -> None:
        self._patches = patches

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        patch = self._patches.get(name)
        if patch is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):  # type: ignore[no-untyped-def]
            load(module)
            patch(module)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def _positive_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def _install() -> None:
    patches: dict[str, Callable[[object], None]] = {}
    delay_us = _positive_int("GATEWAY_NIXL_PROGRESS_DELAY_US")
    if delay_us:
        for name in _NIXL_BINDINGS:
            patches[name] = lambda module: _set_nixl_progress_delay(module, delay_us)
    sleep_us = _positive_int("GATEWAY_SHM_POLL_SLEEP_US")
    if sleep_us:
        patches[_SHM_QUEUE] = lambda module: _sleep_between_queue_checks(module, sleep_us)
    if patches:
        sys.meta_path.insert(0, _PatchOnImport(patches))


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
