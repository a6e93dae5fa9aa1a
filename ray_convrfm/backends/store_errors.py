"""I/O errors on a kernel store, said with the store's path and what was being done.

zarr (and the disk under it) reports a full disk or a store made unwritable as a bare
``[Errno 28] No space left on device`` or ``[Errno 1] Operation not permitted``, naming no
path: a user with several runs cannot tell which folder it was. ``store_io(path, doing)``
re-raises any ``OSError`` of its block as an ``OSError`` of the same errno (so still a
``PermissionError``, ``FileNotFoundError``...) naming ``path`` (a store, one of its arrays)
and ``doing``::

    [Errno 28] No space left on device (writing slab 3 of the kernel store): '/runs/x/K-.../K'

Such an error pickles as it is, so one raised on a Ray worker reaches the driver (as the
``cause`` of Ray's ``RayTaskError``) with the same words.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

#: The errno of an ``OSError`` subclass raised without one (zarr's ``FileNotFoundError``), so
#: that the named error is of the same class (``OSError(ENOENT, ...)`` is a
#: ``FileNotFoundError``) and callers catching it still do.
_CODES = ((FileNotFoundError, errno.ENOENT), (PermissionError, errno.EACCES),
          (FileExistsError, errno.EEXIST), (IsADirectoryError, errno.EISDIR),
          (NotADirectoryError, errno.ENOTDIR))


@contextlib.contextmanager
def store_io(path: str, doing: str) -> Iterator[None]:
    """Run the block; an ``OSError`` in it is re-raised by ``named``. Errors already named
    (by an inner block) and the project's own ``OSError`` classes (``StoreBusyError``) pass
    through as they are."""
    try:
        yield
    except OSError as err:
        if getattr(err, "kernel_store", None) or type(err).__module__.startswith("ray_convrfm"):
            raise
        raise named(err, path, doing) from err


def named(err: OSError, path: str, doing: str) -> OSError:
    """``err`` as ``[Errno N] reason (doing): 'path'``, or the file inside ``path`` that
    ``err`` names (a chunk's); an error without an errno (an fsspec store's) is ``EIO`` with
    its own words as the reason."""
    code = err.errno or next((c for cls, c in _CODES if isinstance(err, cls)), errno.EIO)
    if err.errno is None:
        reason = str(err) or type(err).__name__
    else:
        reason = err.strerror or os.strerror(code)
    inner = os.fspath(err.filename) if isinstance(err.filename, (str, os.PathLike)) else ""
    where = inner if str(inner).startswith(f"{str(path).rstrip('/')}/") else str(path)
    out = OSError(code, f"{reason} ({doing})", where)
    out.kernel_store = str(path)
    return out


def part_name(layout: str, i: int, j: int | None = None, *, to: int | None = None) -> str:
    """How a message names block (i, j) of a kernel (``slab i`` in the "slabs" layout), or
    (j None) its block rows (slabs) i..to - 1."""
    slabs = layout == "slabs"
    if j is not None:
        return f"slab {i}" if slabs else f"block ({i}, {j})"
    many = to is not None and to - i > 1
    return (f"{'slab' if slabs else 'block row'}{'s' if many else ''} {i}"
            + (f"..{to - 1}" if many else ""))
