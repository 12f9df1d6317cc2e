"""The `python` tool: run a model's code in a separate, limited process and return its output as text.

    env.options.tools: [twofold.envs.sandbox:python]

Each call runs `python -I` in a fresh empty temporary directory, with a clean environment (no variable of
the trainer's: no secrets), and these limits (docs/reliability.md lists what they guarantee and what not;
this is a process sandbox, not a VM):

    wall clock      TIMEOUT_S, then the whole process group is killed
    CPU time        RLIMIT_CPU
    memory          RLIMIT_AS
    processes       the audit hook refuses fork / exec / subprocess outright; RLIMIT_NPROC too (under root,
                    where it does not apply, the code runs as `nobody` with a system Python when one exists)
    output          stdout and stderr go to a file capped by RLIMIT_FSIZE; the model sees the first
                    MAX_OUTPUT characters
    network         a new network namespace when the kernel allows one (root, or unprivileged user
                    namespaces), so there is no interface but a down loopback; and the audit hook refuses
                    socket connect / bind / sendto either way
    files           writes outside the working directory, and reading other processes' /proc entries,
                    are refused by the audit hook; under root, file permissions as `nobody` apply too
    native code     ctypes is refused by the audit hook (it could bypass the hook)

Everything that goes wrong comes back as text ("error: ..."), never as an exception in the trainer.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

TIMEOUT_S = 5.0
CPU_SECONDS = 5
MEMORY_BYTES = 512 * 2**20
MAX_PROCESSES = 32
MAX_OUTPUT = 2000  # characters the model sees
MAX_OUTPUT_FILE = 64 * 1024  # bytes the process may write before it is stopped

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000

# Runs inside the child before the model's code: the audit hook cannot be removed once added.
GUARD = r"""
import os, sys
ROOT = os.path.realpath(os.getcwd())
REFUSED = {"os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
           "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg",
           "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof"}
# modules that reach the system without an audit event of their own (processes, native calls)
REFUSED_IMPORTS = {"_posixsubprocess", "_ctypes", "ctypes", "_multiprocessing", "_xxsubinterpreters"}
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def guard(event, args):
    if event in REFUSED:
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "import" and args[0] in REFUSED_IMPORTS:
        raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
    if event == "open" and isinstance(args[0], (str, bytes)):
        path = os.path.realpath(os.fsdecode(args[0]))
        writing = (args[2] or 0) & WRITE or any(c in (args[1] or "") for c in "wax+")
        if writing and not (path == ROOT or path.startswith(ROOT + os.sep)):
            raise PermissionError(f"sandbox: writing {path} (outside the working directory) is not allowed")
        if path.startswith("/proc/") and not path.startswith(("/proc/self/", f"/proc/{os.getpid()}/")):
            raise PermissionError(f"sandbox: reading {path} is not allowed")
code = open("main.py").read()
sys.addaudithook(guard)
try:
    exec(compile(code, "<python tool>", "exec"), {"__name__": "__main__"})
except SystemExit:
    raise
except BaseException as e:  # the model's frames only, not this guard's
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
"""


def _isolate_network() -> bool:
    """A new network namespace for this (child) process, if the kernel lets us; True when it did."""
    libc = ctypes.CDLL(None, use_errno=True)
    return any(libc.unshare(flags) == 0 for flags in (CLONE_NEWNET, CLONE_NEWUSER | CLONE_NEWNET))


def _interpreter() -> tuple[str, bool]:
    """(the Python to run the code with, whether to run it as nobody). Under root the code runs as nobody
    when a system Python that nobody may execute exists (a virtualenv under /root is not reachable to it)."""
    if os.getuid() != 0:
        return sys.executable, False
    system = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if system and os.stat(system).st_mode & 0o001 and _world_traversable(Path(system).resolve().parent):
        return system, True
    return sys.executable, False


def _world_traversable(folder: Path) -> bool:
    return all(p.stat().st_mode & 0o001 for p in (folder, *folder.parents))


def _limit(as_nobody: bool) -> None:
    """In the child, between fork and exec: a network namespace, the limits, then (under root) nobody."""
    _isolate_network()
    # CPU: SIGXCPU at the soft limit (it names the reason), SIGKILL a second later if the code catches it
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 1))
    for what, value in (
        (resource.RLIMIT_AS, MEMORY_BYTES),
        (resource.RLIMIT_NPROC, MAX_PROCESSES),
        (resource.RLIMIT_FSIZE, MAX_OUTPUT_FILE),
        (resource.RLIMIT_CORE, 0),
    ):
        resource.setrlimit(what, (value, value))
    if as_nobody:  # root ignores RLIMIT_NPROC and file permissions: run the code as nobody
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)


def network_isolated() -> bool:
    """Whether this machine gives the tool a network namespace (checked in a throwaway child)."""
    probe = [
        sys.executable,
        "-c",
        "import ctypes,sys; l=ctypes.CDLL(None); "
        f"sys.exit(0 if l.unshare({CLONE_NEWNET}) == 0 or l.unshare({CLONE_NEWUSER | CLONE_NEWNET}) == 0 else 1)",
    ]
    return subprocess.run(probe, capture_output=True).returncode == 0


def python(code: str) -> str:
    """Run Python code in a sandbox and return what it printed (stdout and stderr).

    Args:
        code: A Python program; print what you want to see.
    """
    workdir = tempfile.mkdtemp(prefix="twofold-python-")
    try:
        os.chmod(workdir, 0o777)  # writable by nobody, the user the code runs as under root
        Path(workdir, "main.py").write_text(code)
        out_path = Path(workdir, ".output")
        with open(out_path, "wb") as out:
            os.chmod(out_path, 0o666)
            interpreter, as_nobody = _interpreter()
            proc = subprocess.Popen(
                [interpreter, "-I", "-c", GUARD],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"},
                preexec_fn=lambda: _limit(as_nobody),
            )
            try:
                code_ = proc.wait(timeout=TIMEOUT_S)
                why = None
            except subprocess.TimeoutExpired:
                why = f"stopped after {TIMEOUT_S:g} s of wall-clock time"
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the process and anything it left behind
                proc.wait()
        text = out_path.read_bytes()[: 4 * MAX_OUTPUT].decode("utf-8", "replace")
        size = out_path.stat().st_size
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if why is None:
        why = _why(code_, size)
    shown = text[:MAX_OUTPUT] + ("\n... (output cut)" if len(text) > MAX_OUTPUT or size >= MAX_OUTPUT_FILE else "")
    return f"error: {why}\n{shown}".rstrip() if why else shown.rstrip()


def _why(returncode: int, output_bytes: int) -> str | None:
    """Why the process did not finish normally, in words; None when it exited 0."""
    if returncode == 0:
        return None
    if returncode < 0:
        sig = signal.Signals(-returncode)
        reason = {
            signal.SIGXCPU: f"stopped after {CPU_SECONDS} s of CPU time",
            signal.SIGXFSZ: f"stopped after {MAX_OUTPUT_FILE} bytes of output",
            signal.SIGKILL: "killed",
        }.get(sig, f"killed by {sig.name}")
        return reason
    if output_bytes >= MAX_OUTPUT_FILE:
        return f"stopped after {MAX_OUTPUT_FILE} bytes of output"
    return f"exit status {returncode}"
