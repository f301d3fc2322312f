"""Running the scripts in processes of their own: each launch in a process group that is ended when it finishes, on
a time-out or a failure, and checked to have left nothing behind. A hang is a failure, never a wait."""

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def start(command: list[str], env: dict, log=None) -> subprocess.Popen:
    """A launch whose output is read at its end, or, for a server that logs as it goes, written to the file `log`
    (a pipe nobody reads would fill, and stop it). A process group of its own, not a session: vLLM's server started in
    a new session answered a third as many requests and dropped connections."""
    output = subprocess.PIPE if log is None else open(log, "w")
    process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT if log else output,
                               text=True, process_group=0)
    process.log = log
    return process


def finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a launch; on a time-out its whole process group is killed. Either way nothing of it may be left."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end(process)
        raise AssertionError(f"still running after {timeout} s, killed\n{output(process)[-4000:]}")
    finally:
        end(process)
    if process.log is not None:  # stdout and stderr went to the log, together
        stdout = stderr = Path(process.log).read_text()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def output(process: subprocess.Popen) -> str:
    """What an ended launch printed."""
    if process.log is not None:
        return Path(process.log).read_text()
    stdout, stderr = process.communicate()
    return f"{stdout}\n{stderr}"


def end(process: subprocess.Popen) -> None:
    """Kill whatever is left in the launch's process group, and check that nothing is."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)  # the launcher itself is ours to reap; its children are reaped by init
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of {process.args[:6]} outlived the test")


def run(command: list[str], env: dict, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = finish(start(command, env), timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-4000:]}")
    return result


def free_port() -> int:
    """A port for a server to listen on, outside the kernel's ephemeral range: a port the kernel hands out (bind to
    0) can be taken by any outgoing connection between this check and the server's bind, one outside the range only
    by another listener."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [port for port in range(10000, 65536) if not low <= port <= high]
    for port in random.Random(os.getpid()).sample(candidates, 50):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port outside the ephemeral range")


@contextlib.contextmanager
def serving(command, env: dict, log: Path, ready_within: float):
    """A server started by `command(port)` on a free port of 127.0.0.1, in a process group of its own; yields its
    base URL once its /health answers 200, and ends the whole group however the block ends."""
    port = free_port()
    process = start(command(port), env, log=log)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + ready_within
        while not answers_health(url):
            assert process.poll() is None, Path(log).read_text()[-4000:]
            assert time.time() < deadline, f"no answer on /health within {ready_within} s"
            time.sleep(0.5)
        yield url
    finally:
        end(process)


def answers_health(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def transformers_serve(folder, log: Path):
    """`transformers serve` (the OpenAI-compatible server of `transformers[serving]`) on `folder`, as `serving`."""
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(folder), "--host", "127.0.0.1",
               "--device", "cpu"]
    return serving(lambda port: [*command, "--port", str(port)], {**os.environ, "OMP_NUM_THREADS": "1"}, log,
                   ready_within=120)
