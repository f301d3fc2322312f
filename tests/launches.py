"""Running the scripts in processes of their own: each launch in a process group that is ended when it finishes, on
a time-out or a failure, and checked to have left nothing behind. A hang is a failure, never a wait."""

import os
import signal
import subprocess
import time


def start(command: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    """Wait for a launch; on a time-out its whole process group is killed. Either way nothing of it may be left."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        end(process)
        stdout, stderr = process.communicate()
        raise AssertionError(f"still running after {timeout} s, killed\n{stdout}\n{stderr[-4000:]}")
    finally:
        end(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


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
