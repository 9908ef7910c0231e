"""The `tensord` command: the one part of the ``tensord`` package that is a client of the daemon.

``main`` parses and dispatches; ``serve`` runs the daemon; ``catalogue`` holds the commands that
move no tensor bytes (through the torch-free ``sdk.catalogue.CatalogueClient``, so they start
fast); ``files`` loads and exports checkpoint files through ``sdk.Client``, with the client-side
operations in ``checkpoints``; ``output`` prints tables and JSON.
"""

from tensord.cli.main import main

__all__ = ["main"]
