"""The load pipeline inside the daemon: reservations in the Store, owned by the asking session.

The pipeline is blocking code (file reads, ingest threads); it runs in a worker thread, and
every step that touches the Store or the session goes back to the event loop, where they live.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import numpy as np

from tensord.ingest.pipeline import Loaded, load
from tensord.memory import own_view
from tensord.metrics import Metrics
from tensord.rpc import Session
from tensord.store import Reservation, Store
from tensord_contract.manifest import Table
from tensord_dataplane.slab import SlabAccess

T = TypeVar("T")


async def load_on_daemon(
    store: Store,
    metrics: Metrics,
    session: Session,
    path: str,
    name: str,
    *,
    device: str,
    threads: int,
    logger: logging.Logger,
    **options: Any,
) -> Loaded:
    """Load a checkpoint the daemon reads itself as `name` (`path` its origin) from the files
    opened for it (``passed``, with ``unchanged``: see ``pipeline.load``, as are ``tp``,
    ``rules`` and ``track``)."""
    sink = StoreSink(store, metrics, session, asyncio.get_running_loop())
    try:
        return await asyncio.to_thread(
            functools.partial(
                load,
                sink,
                path,
                name,
                device=device,
                threads=threads,
                logger=logger,
                label=f"load {name}",
                **options,
            )
        )
    except asyncio.CancelledError:
        sink.cancelled = True  # the thread commits nothing; it aborts when its ingest ends
        raise


class StoreSink:
    """A ``pipeline.Sink`` over the daemon's Store, for a pipeline in a worker thread."""

    def __init__(self, store: Store, metrics: Metrics, session: Session, loop: asyncio.AbstractEventLoop) -> None:
        self.store, self.metrics, self.session, self.loop = store, metrics, session, loop
        self.cancelled = False

    def on_loop(self, step: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run `step` on the event loop and wait for it; a cancelled load goes no further."""

        async def unless_cancelled() -> T:
            if self.cancelled:  # checked on the loop too: the cancellation may be queued there
                raise asyncio.CancelledError
            return await step()

        if self.cancelled:
            raise asyncio.CancelledError
        return asyncio.run_coroutine_threadsafe(unless_cancelled(), self.loop).result()

    @contextmanager
    def reserve(self, name: str, table: Table, *, device: str, origin: str) -> Iterator[_Reserved]:
        async def begin() -> _Reserved:
            r = await self.store.reserve(name, device, table, origin)
            self.session.reservations.add(r.id)
            try:
                return _Reserved(self, r)
            except BaseException:
                self.store.abort(r.id)
                self.session.reservations.discard(r.id)
                raise

        reserved = self.on_loop(begin)
        try:
            yield reserved
        finally:
            self.on_loop_anyway(reserved.release)

    def on_loop_anyway(self, step: Callable[[], None]) -> None:
        """Run a cleanup `step` on the loop, cancelled or not."""

        async def run() -> None:
            step()

        asyncio.run_coroutine_threadsafe(run(), self.loop).result()


class _Reserved:
    def __init__(self, sink: StoreSink, r: Reservation) -> None:
        self.sink, self.id, self.manifest = sink, r.id, r.manifest
        self.slab: SlabAccess = own_view(r.slab)
        self.closed = False

    def commit(self, fingerprints: Sequence[int]) -> int:
        store, metrics = self.sink.store, self.sink.metrics

        async def commit() -> int:
            self.close()
            held = await store.commit(self.id, np.array(fingerprints, dtype=np.uint64))
            metrics.moved("ingest", "write", held.manifest.data_bytes)
            return held.manifest.version

        return self.sink.on_loop(commit)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.slab.close()

    def release(self) -> None:
        """Close the view; abort the reservation unless it was committed (abort ignores it then)."""
        self.close()
        self.sink.store.abort(self.id)
        self.sink.session.reservations.discard(self.id)
