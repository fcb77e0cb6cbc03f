"""Thin ctypes wrappers for the Linux calls Python 3.11's os module lacks.

unshare(2), mount(2), umount2(2), reboot(2) (also with an argument),
prctl(PR_SET_PDEATHSIG), finit_module(2), inotify(7), a tty's output mode (ioctl(2):
PID 1 spares itself the termios and fcntl modules for one flag).
Each raises OSError with errno, like the os module does.
"""

from __future__ import annotations

import ctypes
import os
import stat
from functools import cache

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (see pvpy._record)
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2

RB_AUTOBOOT = 0x01234567
RB_HALT_SYSTEM = 0xCDEF0123
RB_POWER_OFF = 0x4321FEDC
RB_RESTART2 = 0xA1B2C3D4  # LINUX_REBOOT_CMD_RESTART2: restart with an argument string
_REBOOT_MAGIC1, _REBOOT_MAGIC2 = 0xFEE1DEAD, 672274793
# glibc's reboot() takes no argument string: the raw syscall, numbered per machine.
SYS_REBOOT = {"aarch64": 142, "x86_64": 169, "armv7l": 88, "riscv64": 142}

MS_MOVE = 8192

# finit_module(2) has no libc wrapper: the syscall number per machine.
SYS_FINIT_MODULE = {"aarch64": 273, "x86_64": 313, "armv7l": 379, "riscv64": 273}

PR_SET_PDEATHSIG = 1


@cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc().unshare(ctypes.c_int(flags)), "unshare")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str = "") -> None:
    _check(
        _libc().mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def umount(target: str, flags: int = 0) -> None:
    _check(_libc().umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def reboot(cmd: int) -> None:
    _check(_libc().reboot(ctypes.c_uint(cmd)), "reboot")


def reboot_with_argument(argument: str) -> None:
    """reboot(2) LINUX_REBOOT_CMD_RESTART2 with ``argument`` (e.g. the Pi's "0 tryboot",
    which the Raspberry Pi kernel's firmware driver hands to the firmware)."""
    number = SYS_REBOOT.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"reboot: unknown syscall number on {os.uname().machine}")
    _check(_libc().syscall(ctypes.c_long(number), ctypes.c_uint(_REBOOT_MAGIC1),
                           ctypes.c_uint(_REBOOT_MAGIC2), ctypes.c_uint(RB_RESTART2),
                           ctypes.c_char_p(argument.encode())), "reboot")  # fmt: skip


def finit_module(fd: int, params: str = "") -> None:
    """Load the kernel module open on ``fd`` (EEXIST when it is loaded already)."""
    number = SYS_FINIT_MODULE.get(os.uname().machine)
    if number is None:
        raise OSError(38, f"finit_module: unknown syscall number on {os.uname().machine}")
    libc = _libc()
    _check(libc.syscall(ctypes.c_long(number), ctypes.c_int(fd), params.encode(),
                        ctypes.c_int(0)), "finit_module")  # fmt: skip


def set_parent_death_signal(signum: int) -> None:
    """Get ``signum`` when the parent dies (kept across execve)."""
    _check(_libc().prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0), "prctl")


IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
IN_CLOSE_WRITE = 0x08
IN_MOVED_TO = 0x80


def inotify_init() -> int:
    """A non-blocking, close-on-exec inotify fd."""
    fd = int(_libc().inotify_init1(ctypes.c_int(IN_CLOEXEC | IN_NONBLOCK)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_init1: {os.strerror(err)}")
    return fd


def inotify_watch(fd: int, path: str, mask: int) -> int:
    wd = int(_libc().inotify_add_watch(ctypes.c_int(fd), path.encode(), ctypes.c_uint32(mask)))
    if wd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"inotify_add_watch {path}: {os.strerror(err)}")
    return wd


TCGETS, TCSETS = 0x5401, 0x5402  # the asm-generic numbers: x86, arm, arm64, riscv
OPOST = 0x1  # c_oflag: post-process output (with ONLCR, "\n" becomes "\r\n")
_TERMIOS_SIZE = 64  # the kernel's struct termios is 36 bytes here: room to spare


def tty_output_raw(fd: int) -> None:
    """Turn off output processing (OPOST) of the tty open on ``fd``; on a pty master,
    that of its slave: what is written to the slave is what the master reads."""
    termios = ctypes.create_string_buffer(_TERMIOS_SIZE)
    _check(_libc().ioctl(ctypes.c_int(fd), ctypes.c_ulong(TCGETS), termios), "ioctl TCGETS")
    oflag = ctypes.c_uint32.from_buffer(termios, 4)  # c_oflag follows c_iflag
    if oflag.value & OPOST:
        oflag.value &= ~OPOST
        _check(_libc().ioctl(ctypes.c_int(fd), ctypes.c_ulong(TCSETS), termios), "ioctl TCSETS")


def mounted(target: str) -> bool:
    """Whether ``target`` is a mount point in this mount namespace."""
    target = os.path.realpath(target)
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == target for line in f)
    except OSError:
        return False


def dir_owner_inside(root: Path, target: str) -> tuple[int, int, int] | None:
    """Owner and mode of the directory at ``target`` under ``root`` (a mounted
    image), or None if there is none. No link is followed: a path through one
    means something inside the container only, not ours to resolve outside it."""
    path = str(root)
    for part in target.strip("/").split("/"):
        if part in ("", ".", ".."):
            return None
        path = os.path.join(path, part)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


EXT4_IOC_CHECKPOINT = 0x4004662B  # _IOW('f', 43, __u32); Linux 5.13+


def ext4_checkpoint(directory: str) -> None:
    """Write ext4's journal out into the file system proper, on the file system
    holding ``directory``: what a reader that does not replay the journal (U-Boot's
    ext4load) sees. Raises OSError: ENOTTY when it is no ext4, EINVAL/EOPNOTSUPP
    on a kernel without the ioctl."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        flags = ctypes.c_uint32(0)
        request = ctypes.c_ulong(EXT4_IOC_CHECKPOINT)
        _check(_libc().ioctl(ctypes.c_int(fd), request, ctypes.byref(flags)), "ext4 checkpoint")
    finally:
        os.close(fd)
