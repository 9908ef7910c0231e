"""tensord: a GPU tensor-store daemon. The client lives in the `sdk` package."""

__version__ = "0.1.0"
