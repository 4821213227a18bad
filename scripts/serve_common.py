"""What the serve scripts share: a free port, waiting for a started server, /proc memory.

Standard library only; the scripts beside it import it (`import serve_common`).
"""

import http.client
import socket
import sys
import time


def free_port():
    """A TCP port on 127.0.0.1 that is free now (a parallel job could take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(server, port, what, timeout=300, log=None):
    """Waits until `server` (a Popen) answers GET /health on `port` with 200; exits with a
    message naming `what` (and the end of `log`, a path) when it dies or takes too long."""
    deadline = time.time() + timeout
    while True:
        if server.poll() is not None:
            sys.exit(f"{what}: the server exited with {server.returncode}{tail(log)}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        if time.time() > deadline:
            server.kill()
            sys.exit(f"{what}: the server did not answer /health within {timeout} s{tail(log)}")
        time.sleep(0.2)


def tail(log):
    if not log:
        return ""
    try:
        with open(log, errors="replace") as f:
            return ":\n" + f.read()[-2000:]
    except OSError:
        return ""


def status_mib(pid, key):
    """A memory line of /proc/PID/status (`VmRSS:`, `VmHWM:`) in MiB; NaN once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
