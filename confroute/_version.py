"""The package version, in a module of its own: modules read it without importing
the package's lazy ``__init__`` (which would be an import circle)."""

__version__ = "0.1.0"
