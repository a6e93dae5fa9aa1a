"""Files written atomically: each to a temporary name in its own folder, renamed into place.

``write_file(path, write)`` has ``write(tmp)`` fill a temporary file beside ``path``, flushes
it to disk and renames it over ``path``: a failed write (a full disk, a file-size limit, a
killed process) leaves the previous file or none, never a 0-byte or partial one. Inside
``with transaction():`` the renames wait until the block ends without an error, so several
files (a model's config and tensors, a run's results) are replaced together or not at all;
a failure removes every temporary file and every folder the block created. Any failure to
write is an ``OSError`` naming the final path (``[Errno 28] No space left on device: PATH``).
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import re
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path


class _Pending:
    """The files and folders of one transaction: (temporary, final) pairs in write order."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []
        self.made: list[Path] = []

    def staged(self, final: Path) -> Path | None:
        return next((tmp for tmp, f in reversed(self.files) if f == final), None)

    def discard(self) -> None:
        for tmp, _ in self.files:
            tmp.unlink(missing_ok=True)
        for folder in reversed(self.made):  # deepest first; only the ones left empty
            with contextlib.suppress(OSError):
                folder.rmdir()

    def commit(self) -> None:
        for i, (tmp, final) in enumerate(self.files):
            try:
                os.replace(tmp, final)
            except OSError as err:
                for rest, _ in self.files[i:]:
                    rest.unlink(missing_ok=True)
                raise _named(err, final) from err


_CURRENT: contextvars.ContextVar[_Pending | None] = contextvars.ContextVar(
    "ray_convrfm_atomic_transaction", default=None)


@contextlib.contextmanager
def transaction() -> Iterator[None]:
    """Every ``write_file`` and ``make_dirs`` in the block is committed when it ends without
    an error (renamed into place in write order), or undone when it raises. Nested blocks
    join the outermost one."""
    if _CURRENT.get() is not None:
        yield
        return
    pending = _Pending()
    token = _CURRENT.set(pending)
    try:
        yield
    except BaseException:
        pending.discard()
        raise
    finally:
        _CURRENT.reset(token)
    try:
        pending.commit()
    except BaseException:
        pending.discard()
        raise


def make_dirs(path: str | os.PathLike[str]) -> Path:
    """``path`` and its missing parents; inside a transaction those it creates are removed
    again (when left empty) if the transaction fails."""
    path = Path(path)
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _named(err, path) from err
    pending = _CURRENT.get()
    if pending is not None:
        pending.made.extend(reversed(missing))
    return path


def write_file(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` creates and fills ``tmp`` (a name beside
    ``path``), which is then flushed to disk and renamed over ``path``, at once or at the end
    of the enclosing ``transaction``. Any failure removes ``tmp`` and is an ``OSError``
    naming ``path``."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    pending = _CURRENT.get()
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) or _is_write_error(err):
            raise _named(err, final) from err
        raise
    if pending is None:
        try:
            os.replace(tmp, final)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise _named(err, final) from err
    else:
        pending.files.append((tmp, final))
    return final


def write_text(path: str | os.PathLike[str], text: str) -> Path:
    """``write_file`` of UTF-8 ``text``."""
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def readable_name(path: str | os.PathLike[str]) -> Path:
    """Where ``path``'s content is now: its temporary file while a transaction holds it."""
    pending = _CURRENT.get()
    staged = pending.staged(Path(path)) if pending is not None else None
    return staged or Path(path)


def _is_write_error(err: Exception) -> bool:
    """A library's I/O failure that is no ``OSError`` (safetensors' ``SafetensorError``)."""
    return type(err).__name__ == "SafetensorError" or _os_code(str(err)) is not None


def _os_code(text: str) -> int | None:
    found = re.search(r"os error (\d+)", text)
    return int(found[1]) if found else None


def _named(err: Exception, path: Path) -> OSError:
    """``err`` as an ``OSError`` on ``path``: ``[Errno N] reason: 'path'``."""
    code = getattr(err, "errno", None) or _os_code(str(err))
    if code:
        return OSError(code, os.strerror(code), str(path))
    return OSError(errno.EIO, f"cannot write ({type(err).__name__}: {err})", str(path))
