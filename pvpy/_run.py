"""The one subprocess wrapper: argv lists, never a shell.

stdin is closed unless input is given, the environment comes from an allow-list,
argv is logged at debug, and failures raise ``CommandError`` with the exit code
and the tail of stderr.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from pvpy.errors import CommandError

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
    return shutil.which(program, path=child_env()["PATH"])


def run(
    argv: Sequence[str],
    *,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` to completion and return its result.

    Raises CommandError when the program is missing, times out, or (with
    ``check``) exits non-zero.
    """
    args = [str(a) for a in argv]
    from pvpy.log import get_logger

    get_logger("run").debug("spawn", argv=args)
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
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

    The child gets a clean signal mask and default handlers for every signal
    (PID 1 must not pass its own signal setup on), stdin from /dev/null, and
    its own session so a signal to our process group does not reach it.
    Raises CommandError when the program cannot be started.
    """
    import signal

    args = [str(a) for a in argv]
    from pvpy.log import get_logger

    get_logger("run").debug("spawn", argv=args)
    actions: list[tuple[int, ...]] = []
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        actions.append((os.POSIX_SPAWN_DUP2, devnull, 0))
        if stdout is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stdout, 1))
        if stderr is not None:
            actions.append((os.POSIX_SPAWN_DUP2, stderr, 2))
        catchable = set(signal.valid_signals()) - {signal.SIGKILL, signal.SIGSTOP}
        try:
            return os.posix_spawnp(
                args[0],
                args,
                child_env(env),
                file_actions=actions,
                setsigmask=(),
                setsigdef=catchable,
                setsid=new_session,
            )
        except OSError as e:
            raise CommandError(args, 127, f"{args[0]}: {e.strerror}") from e
    finally:
        os.close(devnull)
