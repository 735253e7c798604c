"""The package version (read by the file formats without importing the package)."""

__version__ = "0.1.0"
