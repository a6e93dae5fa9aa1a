"""The one progress-bar and logging helper: long stages show one bar each, quiet runs none.

The kernel mathematics never draws bars itself: it takes an ``advance(k)`` callback (or None),
and the callers that own a stage make the bar here.
"""

from __future__ import annotations

from collections.abc import Callable


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "block"):
    """A tqdm bar (a no-op one when ``enabled`` is False); use as a context manager."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


#: What the kernel core reports progress through: ``progress(done_now, total)``.
Progress = Callable[[int, int], None]


class Bar:
    """A ``Progress`` callback that draws one bar, made at the first report (the core knows the
    total, the caller the name); a context manager that closes it."""

    def __init__(self, desc: str, enabled: bool = True, unit: str = "block"):
        self.desc, self.enabled, self.unit = desc, enabled, unit
        self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = progress_bar(total, self.desc, self.enabled, self.unit)
        self._bar.update(done)

    def callback(self) -> Progress | None:
        """Itself, or None when disabled (the core then skips reporting altogether)."""
        return self if self.enabled else None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

