"""Reading an operator's file: a regular file, bounded in size, UTF-8.

The configuration file and the trusted-network files are read at start-up and
on every SIGHUP. A FIFO would block the reader forever, /dev/zero would fill
the memory, so only regular files are read and only up to `MAX_FILE_BYTES`
(1 MiB, far above any real configuration); anything else is a one-line
`UnreadableFile` for the caller to report.
"""

from __future__ import annotations

import os
import stat

__all__ = ["MAX_FILE_BYTES", "UnreadableFile", "read_operator_file"]

#: The largest configuration or trusted-network file repeld reads: 1 MiB.
MAX_FILE_BYTES = 1 << 20


class UnreadableFile(Exception):
    """A file repeld will not read; `str()` is the reason, without the path."""


def read_operator_file(path: str, limit: int = MAX_FILE_BYTES) -> str:
    """The text of the regular file at `path`, at most `limit` bytes of UTF-8."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; regular files ignore it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UnreadableFile("is a directory, not a regular file")
        if not stat.S_ISREG(mode):
            raise UnreadableFile("not a regular file")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # the file may grow while it is read: bounded anyway
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise UnreadableFile(exc.strerror or str(exc)) from None
    finally:
        os.close(fd)
    if size > limit:
        raise UnreadableFile(f"larger than {_size(limit)}")
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"not UTF-8: {exc}") from None


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
