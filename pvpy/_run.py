"""The one subprocess wrapper: argv lists, never a shell.

stdin is closed unless input is given, the environment comes from an allow-list,
argv is logged at debug, and failures raise ``CommandError`` with the exit code
and the tail of stderr.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence

from pvpy.errors import CommandError

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    import subprocess
    from typing import IO

# Only these variables of the caller's environment reach a child.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME", "SOURCE_DATE_EPOCH")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    if extra:
        env.update(extra)
    return env


def which(program: str) -> str | None:
    """The path of ``program`` on the children's PATH, or None. (Not shutil.which:
    PID 1 asks at every boot, and shutil brings bz2 and lzma, ~0.5 MiB.)"""
    if "/" in program:
        return program if os.access(program, os.X_OK) and os.path.isfile(program) else None
    for directory in child_env()["PATH"].split(os.pathsep):
        path = os.path.join(directory or ".", program)
        if os.access(path, os.X_OK) and os.path.isfile(path):
            return path
    return None


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    stdin: IO[bytes] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion and return its result. Its stdin: ``input``, or
    the open file ``stdin`` (streamed by the kernel, never held in memory), or nothing.

    Raises CommandError when the program is missing, times out, or (with
    ``check``) exits non-zero.
    """
    import subprocess  # workstation tools only: PID 1 uses call(), without this module

    args = [str(a) for a in argv]
    from pvpy.log import get_logger

    get_logger("run").debug("spawn", argv=args)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else stdin or subprocess.DEVNULL,
            capture_output=True,
            env=child_env(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(args, 127, f"{args[0]}: not found") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(args, -1, f"timed out after {timeout}s") from e
    if check and proc.returncode != 0:
        raise CommandError(args, proc.returncode, proc.stderr.decode(errors="replace"))
    return proc


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | None = None,
    stderr: int | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
) -> int:
    """Start ``argv`` without waiting; return its pid. The caller reaps it.

    The child gets an empty signal mask and the default action for every
    signal (PID 1 must not pass its own signal setup on), stdin from
    /dev/null, and its own session so a signal to our process group does not
    reach it. fork+exec rather than posix_spawn: glibc's posix_spawn leaves
    its internal signals 32 and 33 ignored in the child, and ignored signals
    survive exec. Raises CommandError when the program cannot be started.
    """
    import signal

    args = [str(a) for a in argv]
    from pvpy.log import get_logger

    get_logger("run").debug("spawn", argv=args)
    environment = child_env(env)
    catchable = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
    report_r, report_w = os.pipe2(os.O_CLOEXEC)  # exec failures come back here
    devnull = os.open(os.devnull, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:  # the child: reset, redirect, exec; never return
        try:
            os.close(report_r)
            for sig in catchable:
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            if new_session:
                os.setsid()
            os.dup2(devnull, 0)
            if stdout is not None:
                os.dup2(stdout, 1)
            if stderr is not None:
                os.dup2(stderr, 2)
            os.execvpe(args[0], args, environment)
        except BaseException as e:
            with contextlib.suppress(BaseException):
                os.write(report_w, f"{args[0]}: {getattr(e, 'strerror', None) or e}".encode())
        os._exit(127)
    os.close(report_w)
    os.close(devnull)
    try:
        problem = os.read(report_r, 4096)
    finally:
        os.close(report_r)
    if problem:
        os.waitpid(pid, 0)
        raise CommandError(args, 127, problem.decode(errors="replace"))
    return pid


def call(argv: Sequence[str], *, timeout: float = 30, check: bool = True) -> int:
    """Run ``argv`` to completion with no output kept but stderr's tail; return
    its exit code. For PID 1: built on ``spawn`` and ``waitpid(pid)``, so the
    subprocess module (about 1 MB) never loads there. Raises CommandError when
    it cannot start, times out, or (with ``check``) exits non-zero.
    """
    import select
    import signal
    import time

    read_fd, write_fd = os.pipe()
    try:
        pid = spawn(argv, stdout=write_fd, stderr=write_fd, new_session=False)
    finally:
        os.close(write_fd)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise CommandError([str(a) for a in argv], -1, f"timed out after {timeout}s")
            ready, _, _ = select.select([read_fd], [], [], left)
            if ready:
                chunk = os.read(read_fd, 65536)
                if not chunk:
                    break
                output = (output + chunk)[-8192:]
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if check and code != 0:
        raise CommandError([str(a) for a in argv], code, output.decode(errors="replace"))
    return code
