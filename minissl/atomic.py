"""Atomic file writes: a temporary file beside the target, flushed to disk, then ``os.replace``.

A reader (or a resumed run) sees the old file or the new one, never half of one: a process killed
during the write (kill -9, power loss) leaves the previous version in place. A failed write (a full
disk, a read-only folder) removes its temporary file and raises an ``OSError`` naming the path.

Example:
    >>> from minissl.atomic import atomic_open, write_text_atomic
    >>> with atomic_open("/tmp/minissl-example.bin") as f:
    ...     _ = f.write(b"bytes")
    >>> write_text_atomic("/tmp/minissl-example.txt", "text").read_text()
    'text'
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file whose content replaces ``path`` only once the ``with`` block succeeds.

    Args:
        path: the target file; its parent folders are created.

    Yields:
        A binary file object of a temporary file beside ``path``.

    Raises:
        OSError: the write failed (e.g. no space left); the message names ``path`` and the cause,
            and the temporary file is gone.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        cause = err.strerror or str(err)
        raise OSError(err.errno, f"could not write {path}: {cause}") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))
