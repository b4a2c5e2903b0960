"""Appending to a file fast and durably: bytes are staged in a page-aligned buffer and written in whole
blocks with O_DIRECT where the file system takes it (the page cache bypassed), else through the page
cache. Measured on the project's 2-core VM, 2 GB written and fsynced from Python: 1.2 s and 0.1 s of CPU
with O_DIRECT, 2.2 to 4.4 s and as much kernel CPU through the page cache."""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT's unit for offsets, lengths and memory: a multiple of any logical block up to 4 KiB
STAGE_BYTES = 8 << 20  # bytes staged between two writes (a multiple of ALIGN)
SYNC_BYTES = 32 << 20  # through the page cache: the file starts going to disk every this many bytes
# O_DIRECT on Linux and some BSDs unless TINYLM_DIRECT_IO=0 (a disk or network file system where the page
# cache writes faster); elsewhere, the page cache
DIRECT = hasattr(os, "O_DIRECT") and os.environ.get("TINYLM_DIRECT_IO", "1") != "0"
REFUSED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}  # what a file system says when it refuses O_DIRECT


class Appender:
    """Appends to one file. Whole ALIGN blocks go to the file with O_DIRECT as the stage fills; the last
    partial block goes through the page cache only when the bytes must be in the file (`write_out`,
    `sync`, `close`), and stays staged, so the next direct write starts on a block boundary again.
    Where O_DIRECT is refused at open (tmpfs, macOS) or at a write, everything goes through the page
    cache, with a writeback hint every SYNC_BYTES so the closing fsync finds little left."""

    def __init__(self, path: Path, dtype: np.dtype, keep: int = 0, direct: bool | None = None) -> None:
        """Open `path` (created if missing) to append values of `dtype` after its first `keep` values;
        later bytes are cut. `direct`: try O_DIRECT (default: DIRECT)."""
        self.path = Path(path)
        direct = DIRECT if direct is None else direct
        self._itemsize = np.dtype(dtype).itemsize
        keep *= self._itemsize
        flags = os.O_WRONLY | getattr(os, "O_BINARY", 0)  # O_BINARY: Windows, which else writes text
        self._fd: int | None = os.open(self.path, flags | os.O_CREAT, 0o666)  # via the page cache
        self._direct: int | None = None
        self._stage: mmap.mmap | None = None
        try:
            os.ftruncate(self._fd, keep)
            if direct:
                with contextlib.suppress(OSError):
                    self._direct = os.open(self.path, flags | os.O_DIRECT)
            self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous memory: page-aligned, as O_DIRECT needs
            self._values = np.frombuffer(self._stage, dtype=dtype)  # the stage, as values
            self._at = keep - keep % ALIGN if self._direct is not None else keep  # file offset of the stage
            self._staged = keep - self._at  # bytes staged (a partial block read back from the file)
            if self._staged:
                with open(self.path, "rb") as f:
                    f.seek(self._at)
                    self._stage[: self._staged] = f.read(self._staged)
        except BaseException:
            self._release()
            raise
        self._unsynced = 0  # bytes written through the page cache since the last writeback hint

    def append(self, values: np.ndarray) -> None:
        """Append `values` (any integer dtype whose values fit: converted as they are staged)."""
        while len(values):
            at = self._staged // self._itemsize
            take = values[: len(self._values) - at]
            self._values[at : at + len(take)] = take
            self._staged += len(take) * self._itemsize
            values = values[len(take) :]
            if self._staged == STAGE_BYTES:
                self._write_blocks()

    def write_out(self) -> None:
        """Put every appended byte in the file (not necessarily on the disk yet)."""
        self._write_blocks()
        if self._staged:  # the partial block: through the page cache, and kept staged
            self._pwrite(self._fd, self._staged)

    def sync(self) -> None:
        """Put every appended byte on the disk (fsync)."""
        self.write_out()
        os.fsync(self._fd)

    def close(self) -> None:
        """sync, then release the file and the stage (once: later calls do nothing)."""
        if self._fd is None:
            return
        try:
            self.sync()
        finally:
            self._release()

    def _write_blocks(self) -> None:
        """Write the staged whole blocks (with O_DIRECT), or every staged byte (through the page cache)."""
        n = self._staged - self._staged % ALIGN if self._direct is not None else self._staged
        if not n:
            return
        if self._direct is not None:
            try:
                self._pwrite(self._direct, n)
            except OSError as exc:  # opened with O_DIRECT, yet refused: the page cache from here on
                if exc.errno not in REFUSED:
                    raise  # a full disk, an I/O error: the caller's to report
                os.close(self._direct)
                self._direct = None
                self._pwrite(self._fd, n)
        else:
            self._pwrite(self._fd, n)
            self._unsynced += n
            if self._unsynced >= SYNC_BYTES and hasattr(os, "posix_fadvise"):
                start = self._at + n - self._unsynced
                # only a hint: DONTNEED starts the writeback of the dirty pages without waiting for it
                with contextlib.suppress(OSError):
                    os.posix_fadvise(self._fd, start, self._unsynced, os.POSIX_FADV_DONTNEED)
                self._unsynced = 0
        rest = self._staged - n
        if rest:
            self._stage.move(0, n, rest)
        self._at += n
        self._staged = rest

    def _pwrite(self, fd: int, n: int) -> None:
        """Write the stage's first `n` bytes at the stage's offset in the file."""
        with memoryview(self._stage) as stage:
            done = 0
            while done < n:
                if hasattr(os, "pwrite"):
                    done += os.pwrite(fd, stage[done:n], self._at + done)
                else:  # Windows
                    os.lseek(fd, self._at + done, os.SEEK_SET)
                    done += os.write(fd, stage[done:n])

    def _release(self) -> None:
        """Close the files and free the stage."""
        for fd in (self._direct, self._fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._direct = self._fd = None
        if self._stage is not None:
            self._values = np.empty(0, dtype=np.uint8)  # the stage's buffer is exported while viewed
            self._stage.close()
            self._stage = None
