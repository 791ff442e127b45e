"""The science of scoring that the loop and the commands share: the per-task truth classifier
(``truth``), reference-set statistics (``refstats``) and forgetting / backward transfer over a task
sequence (``forgetting``). Imports ``core`` and ``data`` only.
"""
