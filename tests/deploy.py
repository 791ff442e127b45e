"""Reading the deployment files the way the tests compare them: requirements.lock, cluster.yaml,
deploy/Dockerfile and the KubeRay manifests under deploy/kuberay/ (no Docker, no Kubernetes
needed). Shared by tests/test_node_env.py and tests/test_kuberay.py."""

from __future__ import annotations

import re
import shlex
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
KUBERAY = REPO / "deploy" / "kuberay"


def lock_versions() -> dict[str, str]:
    """``{name (lower case): version}`` of every ``name==version`` line of the lock."""
    out = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: {line!r} is not pinned with =="
            out[name.strip().lower()] = version.strip()
    return out


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def python_tag() -> str:
    """py311: the Python the lock was made with (this venv's)."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def project_image_tag() -> str:
    """The tag that deploy/Dockerfile's image carries: project version, Ray version, Python, GPU."""
    return f"fewshot-orchestrator:{project_version()}-ray{lock_versions()['ray']}-{python_tag()}-gpu"


def cluster_config() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def cluster_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in (cfg.get(k) or [])]


def pip_installs(command: str) -> list[list[str]]:
    """The argument lists of every ``pip install`` (or ``python -m pip install``) in a shell line."""
    out = []
    for part in re.split(r"&&|\|\||;|\n", command):
        try:
            words = shlex.split(part)
        except ValueError:
            words = part.split()
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install" or \
                    words[i].endswith("/pip") and words[i + 1] == "install":
                out.append(words[i + 2:])
                break
    return out


def classify_pip_args(args: list[str]) -> dict:
    """What one ``pip install`` installs: ``lock`` (the files after -r), ``pins`` (name==version),
    ``unpinned`` (anything else named), ``project`` (a path, with or without -e) and ``no_deps``."""
    info: dict = {"lock": [], "pins": [], "unpinned": [], "project": [], "no_deps": False}
    takes_value = {"-r", "--requirement", "-c", "--constraint", "--index-url", "-i", "--extra-index-url",
                   "-f", "--find-links", "--target", "-t", "--root", "--prefix"}
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-r", "--requirement"):
            info["lock"].append(args[i + 1])
            i += 2
            continue
        if a in takes_value:
            i += 2
            continue
        if a == "--no-deps":
            info["no_deps"] = True
        elif a in ("-e", "--editable"):
            info["project"].append(args[i + 1])
            i += 2
            continue
        elif a.startswith("-"):
            pass
        elif a.startswith((".", "/", "~")) or a == ".":
            info["project"].append(a)
        elif re.fullmatch(r"[A-Za-z0-9_.\-\[\],]+==[A-Za-z0-9_.+\-]+", a):
            info["pins"].append(a)
        else:
            info["unpinned"].append(a)
        i += 1
    return info


def dockerfile() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``(ARG defaults, [(instruction, text)])`` of deploy/Dockerfile, continuation lines joined,
    ``${ARG}`` expanded with the defaults."""
    lines: list[str] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append((buf + raw).strip())
        buf = ""
    args: dict[str, str] = {}
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip().strip('"')
        rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), rest)
        out.append((instr, rest))
    return args, out


def manifests() -> dict[str, list[dict]]:
    """Every object of deploy/kuberay/*.yaml, by file name."""
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(KUBERAY.glob("*.yaml"))}


def objects(kind: str) -> list[dict]:
    return [o for objs in manifests().values() for o in objs if o.get("kind") == kind]


def one(kind: str, name: str | None = None) -> dict:
    found = [o for o in objects(kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in deploy/kuberay, found {len(found)}"
    return found[0]


def pod_templates(obj: dict) -> list[tuple[str, dict]]:
    """``(where, pod template)`` of a RayCluster (head, each worker group), a RayJob with its own
    cluster spec, or a Deployment."""
    spec = obj.get("spec") or {}
    out = []
    if obj["kind"] == "RayJob":
        spec = spec.get("rayClusterSpec") or {}
    if "headGroupSpec" in spec:
        out.append(("head", spec["headGroupSpec"]["template"]))
        for g in spec.get("workerGroupSpecs") or []:
            out.append((f"worker group {g['groupName']}", g["template"]))
    elif obj["kind"] == "Deployment":
        out.append(("pod", spec["template"]))
    return out


def container_env(container: dict) -> dict[str, str]:
    """A container's environment with ``envFrom`` ConfigMaps of deploy/kuberay resolved (values
    from Secrets or fields appear as ``<from ...>``)."""
    maps = {o["metadata"]["name"]: o.get("data") or {} for o in objects("ConfigMap")}
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        if "configMapRef" in src:
            name = src["configMapRef"]["name"]
            assert name in maps, f"container {container['name']}: envFrom ConfigMap {name} is not in deploy/kuberay"
            env.update(maps[name])
        else:
            env[f"<{next(iter(src))}>"] = "<from elsewhere>"
    for e in container.get("env") or []:
        env[e["name"]] = e["value"] if "value" in e else f"<from {next(iter(e['valueFrom']))}>"
    return env
