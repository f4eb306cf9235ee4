"""The package version (a leaf: the task-file writer records it without importing the package root)."""

__version__ = "0.2.0"
