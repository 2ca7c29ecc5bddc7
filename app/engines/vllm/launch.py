"""Runs vLLM's OpenAI server under a small supervisor: `python -m app.engines.vllm.launch ARGS...`.

The engine replica starts this in a process group of its own. vLLM's API server starts an
engine-core process, which starts workers; when the API server dies, by a signal or a crash, those
go on running and keep their memory (measured: SIGKILL or SIGTERM to the API server left the engine
core behind). And when a Ray worker exits, Ray SIGKILLs its direct children, so a supervisor that is
the replica's child dies without a chance to clean up (measured too).

So this forks: the first process exits at once, and the supervisor, no longer the replica's child,
watches the replica's pid. When it is told to stop (SIGTERM to the group), when the replica dies, or
when the API server exits, it stops the whole group: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys

# Overridable so tests can supervise a stand-in that behaves like vLLM's process tree.
SERVER_MODULE = os.environ.get("GATEWAY_ENGINE_SERVER_MODULE", "vllm.entrypoints.openai.api_server")
GRACE_S = float(os.environ.get("GATEWAY_ENGINE_STOP_GRACE_S", "10"))


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _replica_watch(replica_pid: int) -> int | None:
    """A pidfd that turns readable when the replica exits (None where pidfds are missing)."""
    try:
        return os.pidfd_open(replica_pid)
    except (AttributeError, OSError):
        return None


def _replica_gone(replica_pid: int, pidfd: int | None, wait_s: float) -> bool:
    if pidfd is not None:
        return bool(select.select([pidfd], [], [], wait_s)[0])
    select.select([], [], [], wait_s)
    try:
        os.kill(replica_pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def _stop_group(server: subprocess.Popen[bytes] | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal below reaches this process too
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGTERM)
    if server is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=GRACE_S)
    # Whatever is left (an engine core whose API server is gone) goes now, and this process with it.
    os.killpg(0, signal.SIGKILL)


def main() -> None:
    replica = int(os.environ.pop("GATEWAY_ENGINE_PARENT_PID", os.getppid()))
    if os.fork() > 0:
        os._exit(0)  # the replica reaps this one; the supervisor below stays in the group
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    pidfd = _replica_watch(replica)
    server: subprocess.Popen[bytes] | None = None
    try:
        if pidfd is None and _replica_gone(replica, None, 0):
            raise _Stop
        server = subprocess.Popen([sys.executable, "-m", SERVER_MODULE, *sys.argv[1:]])
        while server.poll() is None and not _replica_gone(replica, pidfd, 0.5):
            pass
    except _Stop:
        pass
    _stop_group(server)


if __name__ == "__main__":
    main()
