"""Progress lines in the driver's console, read from the run's MLflow record.

Workers' own output (and Ray's: Train's per-report INFO lines, C++ warnings of its controller
actors) stays in Ray's log files (``ray.init(log_to_driver=False)``, unless ``--debug``): the
driver prints one line per report itself, from what rank 0 logged to MLflow (the run's
``orchestrate.logged_step`` tag and its latest metrics), so the console holds only the tool's own
lines.
"""

from __future__ import annotations

import sys
import threading

from orchestrator.records import tracking

SHOWN = ("loss", "fid_domain", "intra_dist_domain", "target_rate_domain", "target_rate")
EVALUATED = SHOWN[1:]


class ProgressPrinter:
    def __init__(self, tracking_uri: str, run_id: str, name: str, steps: int, tag: str = tracking.TAG_LOGGED,
                 interval_s: float = 1.0):
        self.uri, self.run_id, self.name, self.steps, self.tag = tracking_uri, run_id, name, steps, tag
        self.interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"progress-{name}", daemon=True)
        self._last = -1
        self._evaluated: dict[str, float] = {}

    def __enter__(self) -> "ProgressPrinter":
        try:
            self._last = tracking.logged_step(self.uri, self.run_id, self.tag)
        except Exception:
            self._last = -1
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the last report

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a transient tracking error: next poll
                pass

    def poll(self) -> None:
        run = tracking.client(self.uri).get_run(self.run_id)
        step = int(run.data.tags.get(self.tag, -1))
        if step <= self._last:
            return
        self._last = step
        m = run.data.metrics
        # An evaluation logs these together every eval_every steps; MLflow's run record keeps only
        # their latest values, so a report between evaluations would repeat the last one's numbers
        # as if new. They are shown when they changed, i.e. at the report that evaluated. (Asking
        # the server for each metric's history instead, a query per metric and report, made the
        # cluster test of a killed worker restarting from its checkpoint fail every time; the
        # mechanism was not established, so this printer asks for nothing more than the run.)
        evaluated = {k: m[k] for k in EVALUATED if k in m}
        fresh = evaluated != self._evaluated
        self._evaluated = evaluated
        shown = " ".join(f"{k} {m[k]:.4g}" for k in SHOWN if k in m and (k not in EVALUATED or fresh))
        rate = f" ({m['steps_per_s']:.2f} steps/s)" if "steps_per_s" in m else ""
        sys.stdout.write(f"[{self.name}] step {step}/{self.steps} {shown}{rate}\n")
        sys.stdout.flush()
