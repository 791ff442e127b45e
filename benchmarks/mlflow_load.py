"""Can one `mlflow server` on SQLite (as cluster.yaml starts it) take a sweep's logging?

N concurrent trials (default 32) each open an MLflow run as a sweep trial does (run, params) and
then log as the training loop does: every ``--every`` steps of ``--step-ms`` ms, one ``log_batch``
request with the report's metrics and the ``orchestrate.logged_step`` tag
(``orchestrator.records.tracking.MetricBuffer``, the loop's own code path). Each trial is a thread with
its own client; every request's latency and every error is recorded. Two phases:

* ``paced``: the rate a real sweep makes (N trials x one request per every*step-ms), for
  ``--seconds``: does the server keep up, with what latency, and does SQLite refuse anything?
* ``flat out``: the same trials with no pause: the server's ceiling on this machine.

The server runs exactly as in cluster.yaml (``--workers 1``, ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``,
SQLite backend, a local folder standing in for the S3 artifact destination) on a loopback port.
Here the load generator and the server share 2 cores; on a cluster the server has the head's
cores to itself, so these are lower bounds.

    python -m benchmarks.mlflow_load [--trials 32] [--every 10] [--step-ms 20] [--seconds 60]
    python -m benchmarks.mlflow_load --report-only
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.common import RESULTS, cores, read_result, write_markdown
from orchestrator.records import tracking

METRICS = ("loss", "loss_simple", "loss_pa", "grad_norm", "lr", "steps_per_s", "images_per_s", "data_s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Server settings compared: cluster.yaml's as it stood, and SQLAlchemy without a connection pool
# (each request opens its own SQLite connection; MLflow reads MLFLOW_SQLALCHEMYSTORE_POOLCLASS).
VARIANTS = {"default pool (cluster.yaml before)": {},
            "NullPool (cluster.yaml now)": {"MLFLOW_SQLALCHEMYSTORE_POOLCLASS": "NullPool"}}


def start_server(work: Path, extra_env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **extra_env}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{work / 'mlflow.db'}", "--artifacts-destination", str(work / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            cwd=work, env=env, stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            return proc, uri
        except OSError:
            if proc.poll() is not None:
                raise SystemExit(f"mlflow server exited: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(1)
    raise SystemExit("mlflow server did not answer within 180 s")


def trial(uri: str, exp_id: str, name: str, interval: float, stop: float, out: dict) -> None:
    lat, errors = out.setdefault("latency", []), out.setdefault("errors", [])
    try:
        run_id = tracking.start_run(uri, exp_id, name, tags={tracking.TAG_KIND: "trial"})
        tracking.log_params(uri, run_id, {f"method_config.p{i}": str(i) for i in range(40)})
    except Exception as exc:  # noqa: BLE001 (counted, not raised: the table says how many)
        errors.append(f"start: {type(exc).__name__}: {exc}")
        return
    buf = tracking.MetricBuffer(uri, run_id)
    step, nxt = 0, time.perf_counter()
    while time.perf_counter() < stop:
        step += 10
        buf.add({m: 1.0 / step for m in METRICS}, step)
        t0 = time.perf_counter()
        try:
            buf.flush(tags={"orchestrate.logged_step": str(step)})
            lat.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            buf = tracking.MetricBuffer(uri, run_id)
        nxt += interval
        time.sleep(max(0.0, nxt - time.perf_counter()))
    try:
        tracking.end_run(uri, run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001
        errors.append(f"end: {type(exc).__name__}: {exc}")


def phase(uri: str, label: str, trials: int, interval: float, seconds: float) -> dict:
    exp_id = tracking.get_or_create_experiment(uri, f"load-{label.replace(' ', '-')}")
    outs = [dict() for _ in range(trials)]
    t0 = time.perf_counter()
    stop = t0 + seconds
    threads = [threading.Thread(target=trial, args=(uri, exp_id, f"t{i:02d}", interval, stop, outs[i]), daemon=True)
               for i in range(trials)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 300)
    wall = time.perf_counter() - t0
    lat = sorted(x for o in outs for x in o.get("latency", []))
    errors = [e for o in outs for e in o.get("errors", [])]

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")

    return {"phase": label, "trials": trials, "interval_s": interval, "seconds": seconds, "wall_s": wall,
            "requests": len(lat), "target_rps": trials / interval if interval else None,
            "achieved_rps": len(lat) / wall, "errors": len(errors), "error_kinds": sorted(set(errors))[:5],
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "max_ms": lat[-1] * 1000 if lat else float("nan"),
            "mean_ms": statistics.fmean(lat) * 1000 if lat else float("nan")}


def measure(args) -> dict:
    load_before = os.getloadavg()[0]
    interval = args.every * args.step_ms / 1000
    rows = []
    for variant in args.variants:
        work = Path(tempfile.mkdtemp(prefix="mlflow-load-"))
        proc, uri = start_server(work, VARIANTS[variant])
        try:
            for r in (phase(uri, "one trial, flat out", 1, 0.0, args.seconds / 4),
                      phase(uri, "paced", args.trials, interval, args.seconds),
                      phase(uri, "flat out", args.trials, 0.0, args.seconds / 2)):
                rows.append({"server": variant, **r})
                print(rows[-1], flush=True)
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(timeout=60)
    import mlflow

    return {"rows": rows, "machine": cores(), "date": time.strftime("%Y-%m-%d"),
            "mlflow": mlflow.__version__, "load_before": load_before, "load_after": os.getloadavg()[0],
            "every": args.every, "step_ms": args.step_ms, "seconds": args.seconds}


def report(data: dict) -> str:
    out = [f"## MLflow under a sweep's logging (`mlflow_load.py`, {data['machine']}, {data['date']})", "",
           f"`mlflow server` {data['mlflow']} as cluster.yaml starts it (SQLite, `--workers 1`, no job runner), on loopback; each "
           f"trial a thread logging one `log_batch` ({len(METRICS)} metrics + the logged-step tag) every "
           f"{data['every']} steps of {data['step_ms']} ms; {data.get('seconds', 60):.0f} s paced, half that flat out. Load average {data['load_before']:.2f} before, "
           f"{data['load_after']:.2f} after; the load generator shares the 2 cores with the server.", "",
           "| server | phase | trials | target req/s | achieved req/s | requests | errors | p50 ms | p99 ms | max ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        target = f"{r['target_rps']:.0f}" if r["target_rps"] else "-"
        out.append(f"| {r['server']} | {r['phase']} | {r['trials']} | {target} | {r['achieved_rps']:.1f} | "
                   f"{r['requests']} | {r['errors']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} |")
    kinds = sorted({f"{r['server']}: {k}" for r in data["rows"] for k in r["error_kinds"]})
    if kinds:
        out += ["", "Errors seen (first kinds):", ""] + [f"- {k}" for k in kinds]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=32)
    ap.add_argument("--every", type=int, default=10, help="steps between two reports")
    ap.add_argument("--step-ms", type=float, default=20.0, help="one training step (a small model on a GPU)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS / "mlflow_load.json")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    data = read_result(args.out) if args.report_only else measure(args)
    if not args.report_only:
        args.out.write_text(json.dumps(data, indent=1))
    write_markdown(args.out, report(data))


if __name__ == "__main__":
    main()
