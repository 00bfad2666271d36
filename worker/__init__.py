"""streambench engine: what one GPU host does."""

__version__ = "0.1.0"
