"""What MLflow holds and how it is written: the client wrappers (``tracking``), the lease that
refuses a second live driver of a run (``lease``), the recorder seam the training loop reports to
(``recorder``: MLflow in production, in memory in tests and benchmarks), step bookkeeping
(``progress``) and the exported model as an MLflow pyfunc model (``mlflow_model``).
"""
