"""Sweeps and what they teach: the Ray Tune driver and its trials (``sweep``), the search
space (``space``), the searcher and samplers (``searcher``, ``samplers``), the kept Optuna study
(``study``), the sweep report (``report``) and the best configs (``best``).
"""
