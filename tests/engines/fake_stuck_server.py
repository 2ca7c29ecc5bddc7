"""A stand-in vLLM server that crashes a thread while starting and then never becomes ready."""

import sys
import time

if __name__ == "__main__":
    print("Exception in thread nixl_handshake_listener:", flush=True)
    print("zmq.error.ZMQError: Address already in use", flush=True)
    time.sleep(600)
    sys.exit(0)
