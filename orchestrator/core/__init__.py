"""The bottom layer: what every other part reads and nothing of the orchestrator below it.
The user's config and its validation (``config``), the errors users cause (``errors``), the names
that become paths and run names (``names``), secret redaction (``redact``), Ctrl-C/SIGTERM handling
(``interrupts``) and the saved RNG state of a run (``rng``).
"""
