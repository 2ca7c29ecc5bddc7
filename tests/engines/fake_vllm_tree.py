"""A stand-in for vLLM's process tree: an "API server" that starts an "engine core" which ignores
SIGTERM and outlives its parent, as vLLM's does. Writes the engine core's pid to argv[1]."""

import signal
import subprocess
import sys
import time

if __name__ == "__main__":
    core = subprocess.Popen([sys.executable, "-c",
                             "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    with open(sys.argv[1], "w") as f:
        f.write(str(core.pid))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the API server exits, its core does not
    time.sleep(600)
