"""Benchmarks: scripts that measure and write tables (``python -m benchmarks.NAME`` from the
repository root; see benchmarks/README.md). They call the project's public names and share one
helper module, ``benchmarks.common``."""
