"""Writing outputs without ever losing the user's data.

Every folder graphprune writes goes through `AtomicOutput`: the location is checked against the
user's own files (`check_output_location`), one run at a time holds it (`OutputLock`), the result
is built in a hidden sibling and renamed into place only when everything worked, and leftovers of
killed runs on the same output are removed first (the lock proves their owners are gone).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

from .errors import UserError


class OutputError(UserError):
    """The output location is unsafe, in use by another run, or exists without --force."""


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output_location(target: str | Path, inputs: dict[str, Path], sources: dict[str, Path]) -> None:
    """Refuse an output whose replacement (`--force`) or writing could destroy the user's files.

    `inputs` (model and teacher folders) must not be, contain or hold the output; `sources` (the spec's
    and data files' folders) must not be or lie inside it. The current directory, the home folder and
    `/` are always protected.
    """
    if not str(target).strip():
        raise OutputError("output: empty; name a new folder for the pruned model")
    output = _resolved(target)
    protected = {**sources, "the current directory": Path.cwd(), "the home folder": Path.home(), "/": Path("/")}
    for what, folder in inputs.items():
        folder = _resolved(folder)
        if _is_within(output, folder) or _is_within(folder, output):
            raise OutputError(f"output {output}: {'is' if output == folder else 'overlaps'} {what} ({folder}); "
                              "graphprune never writes into or over its inputs: choose a folder outside it")
    for what, folder in protected.items():
        folder = _resolved(folder)
        if _is_within(folder, output):
            raise OutputError(f"output {output}: {'is' if output == folder else 'contains'} {what} ({folder}); "
                              "replacing it would delete it: choose a new folder")


class OutputLock:
    """An exclusive lock on one output path for a whole run (`.<name>.lock` beside it, holding the pid)."""

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f".{target.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputError(f"output {self.target} is being written by another graphprune run (pid {holder}); "
                                  "wait for it to finish or choose another output") from None
            try:  # the holder before us may have removed the file after we opened it: lock the current one
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def remove_leftovers(target: Path) -> None:
    """Remove hidden partial/old siblings of `target` from runs that were killed (call while holding its lock)."""
    for pattern in (f".{target.name}.partial-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            _remove(path)


class AtomicOutput:
    """Build the output in a hidden sibling folder; move it into place only when everything worked.

    On entry: the location is checked (see `check_output_location`), the output's lock is taken for the
    whole block (a second run fails at once), an existing output needs `force`, and leftovers of killed
    runs are removed. On an exception nothing is left behind.
    """

    def __init__(self, target: str | Path, force: bool, inputs: dict[str, Path] | None = None,
                 sources: dict[str, Path] | None = None):
        check_output_location(target, inputs or {}, sources or {})
        self.target = _resolved(target)
        self.force = force
        self.lock = OutputLock(self.target)
        self.temp = self.target.parent / f".{self.target.name}.partial-{os.getpid()}"

    def __enter__(self) -> Path:
        self.lock.__enter__()
        try:
            if (self.target.exists() or self.target.is_symlink()) and not self.force:
                raise OutputError(f"output {self.target} exists; pass --force to replace it")
            remove_leftovers(self.target)
            self.temp.mkdir()
        except BaseException:
            self.lock.__exit__(None, None, None)
            raise
        return self.temp

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is not None:
                shutil.rmtree(self.temp, ignore_errors=True)
                if isinstance(value, OSError) and value.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise OutputError(f"output {self.target}: the disk filled up while writing ({value.strerror}); "
                                      "nothing was written: free some space or choose another disk") from value
                return
            old = None
            if self.target.exists() or self.target.is_symlink():
                old = self.target.parent / f".{self.target.name}.old-{os.getpid()}"
                self.target.rename(old)
            self.temp.rename(self.target)
            if old is not None:
                _remove(old)
        finally:
            self.lock.__exit__(None, None, None)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
