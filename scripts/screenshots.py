"""Screenshots of what a user browses, as a user's browser shows it: the MLflow UI's chart view of
an experiment (runs' metrics side by side), a registered model's page, and a sweep's report.

The runs' sample grids are MLflow images by step: the chart view adds a `samples` image-grid card
after the metric charts, whose step box lines the runs' grids up at one step. That picture needs a
click and typing, so it is driven through Chromium's DevTools protocol (`compare_grids`): scroll the
charts until the card renders, type the last step into its step box, open its enlarged view, wait
until every image has loaded, then capture. (The UI prints each run's params above its grid.)

Everything is made here, on the CPU, with the shipped 32² DDPM source and the built-in sketch
task: two short `orchestrate train` runs with different learning rates (the first registered as
`sketch-ddpm`), one small `orchestrate sweep` (its report is logged on its parent run). Then
`mlflow server` starts on a loopback port over the same store and Debian's `chromium` (headless)
takes the pictures; the server is stopped at the end.

    python scripts/screenshots.py [--workdir DIR] [--out docs/screenshots] [--steps 60]

Needs `chromium` on the PATH (Debian: `apt-get install chromium`). About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "run.eval_samples=32", "--set", "run.final_eval_samples=64", "--set", "run.grid_size=16"]


def orchestrate(work: Path, *args: str) -> str:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "ORCHESTRATE_STORAGE": str(work / "runs"), "PYTHONUNBUFFERED": "1"}
    print("$ orchestrate", " ".join(args), flush=True)
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=work, env=env, text=True,
                         capture_output=True)
    if res.returncode != 0:
        raise SystemExit(f"orchestrate {' '.join(args)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n"
                         f"{res.stderr[-3000:]}")
    return res.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runs(work: Path, steps: int) -> None:
    every = max(1, steps // 2)
    for name, lr in (("sketch-lr3e-4", "3e-4"), ("sketch-lr3e-5", "3e-5")):
        extra = ["--register", "sketch-ddpm"] if name == "sketch-lr3e-4" else []
        orchestrate(work, "train", "ddpm_finetune", "--name", name, "--steps", str(steps), "--set", f"lr={lr}",
                    "--set", f"run.sample_every={every}", *SMALL, *extra)
    orchestrate(work, "sweep", "ddpm_finetune", "--name", "sketch-sweep", "--num-samples", "4", "--max-concurrent",
                "1", "--scheduler", "fifo", "--steps", str(max(10, steps // 3)), "--set", "run.report_every=5",
                "--set", "run.sample_every=1000", *SMALL)


def shoot(url: str, out: Path, size: str = "1500,1000", wait_ms: int = 20000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not on the PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    print(f"wrote {out}", flush=True)


# JavaScript run in the page: the chart card titled `samples` (the image grid), found by its title.
_SAMPLES_CARD = """(() => { const t = [...document.querySelectorAll('*')].find(e => e.textContent.trim() === 'samples'
  && e.getBoundingClientRect().height < 40); if (!t) return null; let c = t;
  for (let i = 0; i < 8 && c; i++) { if (c.querySelectorAll('button').length >= 2
  && c.getBoundingClientRect().height > 200) return c; c = c.parentElement; } return null; })()"""


async def _compare_grids(url: str, out: Path, step: int, devtools_port: int) -> None:
    import aiohttp  # a Ray dependency; only this picture needs a DevTools client

    async with aiohttp.ClientSession() as http:
        pages: list[dict] = []
        for _ in range(60):
            try:
                async with http.get(f"http://127.0.0.1:{devtools_port}/json/list") as r:
                    pages = [t for t in await r.json(content_type=None) if t["type"] == "page"]
                if pages:
                    break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
        if not pages:
            raise SystemExit("chromium's DevTools endpoint did not answer")
        async with http.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            seq = 0

            async def call(method: str, **params) -> dict:
                nonlocal seq
                seq += 1
                await ws.send_str(json.dumps({"id": seq, "method": method, "params": params}))
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("id") == seq:
                        return msg.get("result", {})

            async def js(expr: str):
                r = await call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
                return r.get("result", {}).get("value")

            async def key(name: str, code: int) -> None:
                for kind in ("keyDown", "keyUp"):
                    await call("Input.dispatchKeyEvent", type=kind, key=name, code=name, windowsVirtualKeyCode=code)

            await call("Page.navigate", url=url)
            await asyncio.sleep(15)
            # The chart list is virtualised: scroll its scroll container until the card exists.
            for _ in range(20):
                if await js(f"(() => {{ if ({_SAMPLES_CARD}) return true; [...document.querySelectorAll('div')]"
                            ".filter(d => d.scrollHeight > d.clientHeight + 50 && getComputedStyle(d).overflowY"
                            ".match(/auto|scroll/)).forEach(m => m.scrollTop = m.scrollTop + 1500); return false; })()"):
                    break
                await asyncio.sleep(3)
            else:
                raise SystemExit("the chart view shows no `samples` image card (were grids logged with log_image?)")
            await js(f"{_SAMPLES_CARD}.scrollIntoView({{block: 'center'}})")
            await asyncio.sleep(2)
            if not await js(f"(() => {{ const i = [...{_SAMPLES_CARD}.querySelectorAll('input')]"
                            ".find(i => /^\\d+$/.test(i.value)); if (!i) return false; i.focus(); i.select();"
                            " return true; })()"):
                raise SystemExit("the `samples` card has no step box")
            await call("Input.insertText", text=str(step))
            await key("Enter", 13)
            await js("document.activeElement && document.activeElement.blur()")
            await asyncio.sleep(2)
            await js(f"[...{_SAMPLES_CARD}.querySelectorAll('button')][0].click()")  # the enlarge button
            # Tall enough for both runs' rows (the UI prints every param above each grid).
            await call("Emulation.setDeviceMetricsOverride", width=1400, height=2900, deviceScaleFactor=1,
                       mobile=False)
            for _ in range(40):
                await asyncio.sleep(3)
                state = await js("[...document.querySelectorAll('[role=dialog] img')]"
                                 ".map(i => i.complete && i.naturalWidth > 0)")
                if state and len(state) >= 2 and all(state):
                    break
            else:
                raise SystemExit("the enlarged `samples` view did not load its images within 120 s")
            await asyncio.sleep(2)
            shot = await call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))
    print(f"wrote {out}", flush=True)


def compare_grids(url: str, out: Path, step: int) -> None:
    """The chart view's `samples` card at `step`, enlarged: every run's grid at that one step."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not on the PATH (Debian: apt-get install chromium)")
    port = free_port()
    with tempfile.TemporaryDirectory() as profile:
        browser = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                                    "--hide-scrollbars", f"--user-data-dir={profile}", "--window-size=1600,1100",
                                    f"--remote-debugging-port={port}", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            asyncio.run(_compare_grids(url, out, step, port))
        finally:
            browser.terminate()
            browser.wait(timeout=30)


def ids(work: Path) -> dict[str, str]:
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = c.get_experiment_by_name("ddpm_finetune").experiment_id
    out = {"experiment": exp}
    for name in ("sketch-lr3e-4", "sketch-lr3e-5", "sketch-sweep"):
        out[name] = c.search_runs([exp], filter_string=f"attributes.run_name = '{name}'")[0].info.run_id
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip-runs", action="store_true", help="reuse the runs already in --workdir")
    args = ap.parse_args()
    work = (args.workdir or Path(tempfile.mkdtemp(prefix="screenshots-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_runs:
        make_runs(work, args.steps)
    run = ids(work)
    port = free_port()
    # 127.0.0.2, not 127.0.0.1: MLflow 3's UI opens its assistant panel over the page on first load
    # when the host is localhost/127.0.0.1; a user's server on a cluster head shows no such panel.
    host = "127.0.0.2"
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                               f"sqlite:///{work / 'mlflow.db'}", "--host", host, "--port", str(port),
                               "--workers", "1", "--allowed-hosts", f"{host}:{port},{host}",
                               "--cors-allowed-origins", f"http://{host}:{port}"], cwd=work,
                              stdout=open(work / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        else:
            raise SystemExit("mlflow server did not answer within 120 s")
        exp = run["experiment"]
        shoot(f"{base}/#/experiments/{exp}/runs?compareRunsMode=CHART", args.out / "mlflow_chart_view.png",
              size="1600,1400")
        compare_grids(f"{base}/#/experiments/{exp}/runs?compareRunsMode=CHART", args.out / "mlflow_compare_grids.png",
                      step=args.steps)
        shoot(f"{base}/#/models/sketch-ddpm/versions/1", args.out / "mlflow_registered_model.png")
        report = work / "report-sketch-sweep"
        orchestrate(work, "report", "sketch-sweep", "--out", str(report))
        shoot((report / "report.html").as_uri(), args.out / "sweep_report.png", size="1200,2400", wait_ms=3000)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    print(f"runs in {work}; screenshots in {args.out}")


if __name__ == "__main__":
    main()
