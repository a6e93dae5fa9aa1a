"""A fitted model keeps the workers that computed it: its predictions reuse them.

On a cluster, starting a placement group and actors and shipping the centers costs seconds;
a model that did so for every ``predict`` spent more time starting than scoring. So the fit's
workers stay with the model, reloaded with only its centers (``ShardedBackend.
keep_for_predictions``), until ``close()``, the end of a ``with`` block, or the model's garbage
collection; a model loaded from disk opens its workers on its first prediction, once.
"""

from __future__ import annotations

import weakref


class KeepsWorkers:
    """The workers' lifecycle of an estimator (``ConvRFM``; ``DeepConvRFM`` through its last
    layer): ``_backend`` is never pickled, cloned or saved."""

    _backend = None
    _backend_ready = False
    _backend_options = None
    _backend_finalizer = None

    def _keep_backend(self, backend, options) -> None:
        """Hold ``backend`` (opened with ``options``) for predictions, configured on first use;
        closed with the model, or when the model's options change."""
        self.close()
        backend.ex.keep()  # idle between predictions: released first when room is needed
        self._backend, self._backend_ready, self._backend_options = backend, False, options
        self._backend_finalizer = weakref.finalize(self, backend.close)

    def _kept_backend(self, options):
        """The kept backend when it still serves ``options`` (not closed, not released to make
        room for another pool), else None."""
        backend = self._backend
        if backend is None or backend.ex.closed or self._backend_options != options:
            return None
        return backend

    def close(self) -> None:
        """Release the workers this model keeps (its Ray actors and their reservation); a later
        prediction opens new ones."""
        finalizer, self._backend_finalizer = self._backend_finalizer, None
        self._backend, self._backend_ready = None, False
        if finalizer is not None:
            finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        for name in ("_backend", "_backend_ready", "_backend_options", "_backend_finalizer"):
            state.pop(name, None)
        return state
