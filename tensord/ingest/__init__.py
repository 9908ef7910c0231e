"""Checkpoint files into slabs: the engine and the one load pipeline both sides run.

``engine.ingest_into`` fills a reserved slab from files, ``engine.ingest_ranks`` every rank's
slab of a ``--tp`` load in one pass over them (``reads`` plans and reads the byte ranges);
``pipeline.load`` is read → plan → reserve → ingest → commit over a ``Sink``;
``store_sink`` is that sink inside the daemon (the client's is in ``tensord.cli.checkpoints``).
"""

from tensord.ingest.engine import Ingested, ingest_into, ingest_ranks
from tensord.ingest.pipeline import Loaded, Progress, Sink, default_threads, load

__all__ = ["Ingested", "Loaded", "Progress", "Sink", "default_threads", "ingest_into", "ingest_ranks", "load"]
