"""A pid file that tells the truth: locked while repeld runs, stale otherwise.

The scheme is FreeBSD's pidfile(3) (which daemon(8) uses): the file is opened
without following symlinks and locked with flock(2) for the life of the process.
A second repeld finds the lock held and refuses, naming the pid in the file. A
file left by a process that died is unlocked, whatever pid it names, so it is
replaced: a pid that happens to be alive again (reused by an unrelated process)
does not stop repeld from starting, which is what makes a liveness check with
kill(pid, 0) wrong after a crash.

Ownership after a privilege drop. The file is created as root, before the
drop, and handed to the service user (`create(owner=...)`), like the rest of
what the daemon owns. Removing a file needs write permission on its
directory, not ownership of the file, so:

* `remove()` unlinks the file if the directory permits (e.g. a
  /var/run/repeld/ directory owned by the service user, as systemd's
  RuntimeDirectory=repeld or an rc.d precmd creates it), and otherwise
  truncates it through the held descriptor: an empty pid file is "not
  running" to rc.subr's check_pidfile, to `pkill -F` and to the next start.
* The directory is held open too, so removal still finds the file after a
  chroot.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

__all__ = ["PidFile", "PidFileError", "read_pid"]


class PidFileError(RuntimeError):
    """The pid file cannot be taken; `str()` is one line for the admin."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        """The message, and the running repeld's pid when that is the reason."""
        super().__init__(message)
        #: The pid of the repeld already running, when that is the reason.
        self.pid = pid


def _parse_pid(data: bytes) -> int | None:
    """The pid on the first line of a pid file's contents, or None."""
    first = data.split(b"\n", 1)[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None


def read_pid(path: str | os.PathLike[str]) -> int | None:
    """The pid written in a pid file, or None (missing, unreadable, empty or not a pid)."""
    try:
        return _parse_pid(Path(path).read_bytes()[:64])
    except OSError:
        return None


class PidFile:
    """Create with `create()` (or `with`), release with `remove()`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """A pid file at `path`, not yet taken."""
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the pid file now."""
        return self._fd is not None

    def create(self, pid: int | None = None, owner: tuple[int, int] | None = None) -> None:
        """Take the pid file for `pid` (default: this process), or raise PidFileError.

        `owner` (uid, gid) hands the file to the service user, as root, before
        the privilege drop.
        """
        if self._fd is not None:
            raise PidFileError(f"{self.path}: already held by this process")
        directory, name = os.path.split(os.path.abspath(self.path))
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise PidFileError(f"{self.path}: cannot open directory: {exc.strerror}") from None
        try:
            fd = self._open_locked(dir_fd, name)
        except BaseException:
            os.close(dir_fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid() if pid is None else pid}\n".encode("ascii"))
            os.fsync(fd)
            if owner is not None:
                os.fchown(fd, *owner)
        except OSError as exc:
            os.close(fd)
            os.close(dir_fd)
            raise PidFileError(f"{self.path}: cannot write: {exc.strerror}") from None
        self._fd, self._dir_fd = fd, dir_fd

    def _open_locked(self, dir_fd: int, name: str) -> int:
        """Open (creating if needed) and lock the file; refuse if another holds it."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(10):
            try:
                fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PidFileError(f"{self.path}: is a symbolic link; refusing") from None
                raise PidFileError(f"{self.path}: cannot open: {exc.strerror}") from None
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    raise PidFileError(f"{self.path}: not a regular file; refusing")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _parse_pid(os.pread(fd, 64, 0))
                    who = f"pid {pid}" if pid is not None else "another process"
                    raise PidFileError(
                        f"{self.path}: repeld is already running as {who}", pid
                    ) from None
                # The holder may have unlinked the file between our open and our
                # lock; a lock on an unlinked inode protects nothing: start over.
                if self._same_file(dir_fd, name, fd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        raise PidFileError(f"{self.path}: keeps changing under us; refusing")

    @staticmethod
    def _same_file(dir_fd: int, name: str, fd: int) -> bool:
        """Whether `name` still refers to the inode open at `fd`."""
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)

    def remove(self) -> None:
        """Release the pid file: unlink it if allowed, else leave it empty; never raises."""
        fd, dir_fd = self._fd, self._dir_fd
        if fd is None or dir_fd is None:
            return
        self._fd = self._dir_fd = None
        name = os.path.basename(self.path)
        try:
            # Unlink only our own file: a successor may already have replaced it.
            if self._same_file(dir_fd, name, fd):
                os.unlink(name, dir_fd=dir_fd)
        except OSError:
            # Typically EACCES: the directory is not ours after the privilege
            # drop. Emptied, the file no longer names a pid (best effort: this
            # runs at exit, where there is no one left to tell).
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing releases the lock
            os.close(dir_fd)

    def __enter__(self) -> PidFile:
        """Take the pid file for this process."""
        self.create()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release the pid file."""
        self.remove()
