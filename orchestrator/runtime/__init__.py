"""How one job runs: the job description the driver computes (``job``), the training loop
(``loop``) and its per-process entry (``worker``), the session it checkpoints through
(``session``), the one launcher (``launch``: in process or a ``TorchTrainer``), the one MLflow run
lifecycle (``runrecord``), Ray connection and submission (``raycluster``, ``submit``), distributed
sampling (``sampling``) and the checks before a run starts (``preflight``).
"""
