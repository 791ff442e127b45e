"""deploy/kuberay/: the manifests are well-formed KubeRay ``ray.io/v1`` and Kubernetes objects, and
they say what cluster.yaml says.

No Kubernetes cluster is needed. The schema below is a compact copy of the fields these manifests
use (KubeRay v1.6 CRDs: https://docs.ray.io/en/master/cluster/kubernetes/references/api.html;
Kubernetes core v1 / apps v1: https://kubernetes.io/docs/reference/kubernetes-api/), with their
types, enums and required keys; an unknown or misspelt field fails (the API server would drop it
silently). The semantic rules KubeRay's admission code applies (ray-operator/controllers/ray/utils/
validation.go) that concern these files are checked too. Then the agreements: the Ray version is
the lock's, the head runs no training, the GPU group scales from zero, the token comes from a
Secret, every Ray pod has cluster.yaml's environment, and the MLflow server runs cluster.yaml's
command; that server is started here with the manifest's arguments and answers through the
Service's host name."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import (REPO, cluster_commands, cluster_config, container_env, lock_versions, manifests, objects,
                          one, pod_templates)


# -- a compact schema -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    fields: dict
    required: tuple = ()


@dataclass(frozen=True)
class Map:
    values: Any


@dataclass(frozen=True)
class Enum:
    values: tuple


@dataclass(frozen=True)
class Const:
    value: Any


QUANTITY = (str, int, float)   # "8", 8, 32Gi, 0.5
INT_OR_STR = (int, str)
ANY = object


def Ref(required=("name",)):
    return Obj({"name": str, "key": str, "optional": bool}, required)


ENV_VAR = Obj({"name": str, "value": str,
               "valueFrom": Obj({"secretKeyRef": Ref(("name", "key")), "configMapKeyRef": Ref(("name", "key")),
                                 "fieldRef": Obj({"fieldPath": str, "apiVersion": str}, ("fieldPath",))})},
              ("name",))
ENV_FROM = Obj({"configMapRef": Ref(), "secretRef": Ref(), "prefix": str})
RESOURCES = Obj({"limits": Map(QUANTITY), "requests": Map(QUANTITY)})
PROBE = Obj({"httpGet": Obj({"path": str, "port": INT_OR_STR, "scheme": Enum(("HTTP", "HTTPS"))}, ("port",)),
             "tcpSocket": Obj({"port": INT_OR_STR}, ("port",)), "exec": Obj({"command": [str]}),
             "initialDelaySeconds": int, "periodSeconds": int, "timeoutSeconds": int, "failureThreshold": int})
CONTAINER = Obj({"name": str, "image": str, "imagePullPolicy": Enum(("Always", "IfNotPresent", "Never")),
                 "command": [str], "args": [str], "workingDir": str, "env": [ENV_VAR], "envFrom": [ENV_FROM],
                 "ports": [Obj({"containerPort": int, "name": str, "protocol": Enum(("TCP", "UDP", "SCTP"))},
                               ("containerPort",))],
                 "resources": RESOURCES,
                 "volumeMounts": [Obj({"name": str, "mountPath": str, "readOnly": bool, "subPath": str},
                                      ("name", "mountPath"))],
                 "readinessProbe": PROBE, "livenessProbe": PROBE,
                 "securityContext": Obj({"runAsUser": int, "runAsGroup": int, "runAsNonRoot": bool,
                                         "allowPrivilegeEscalation": bool})},
                ("name", "image"))
VOLUME = Obj({"name": str, "emptyDir": Obj({"medium": Enum(("", "Memory")), "sizeLimit": QUANTITY}),
              "persistentVolumeClaim": Obj({"claimName": str, "readOnly": bool}, ("claimName",)),
              "secret": Obj({"secretName": str}), "configMap": Obj({"name": str})}, ("name",))
TOLERATION = Obj({"key": str, "operator": Enum(("Exists", "Equal")), "value": str,
                  "effect": Enum(("NoSchedule", "PreferNoSchedule", "NoExecute")), "tolerationSeconds": int})
POD_SPEC = Obj({"containers": [CONTAINER], "initContainers": [CONTAINER], "volumes": [VOLUME],
                "tolerations": [TOLERATION], "nodeSelector": Map(str), "serviceAccountName": str,
                "restartPolicy": Enum(("Always", "OnFailure", "Never")), "imagePullSecrets": [Obj({"name": str})],
                "securityContext": Obj({"fsGroup": int, "runAsUser": int, "runAsGroup": int, "runAsNonRoot": bool}),
                "affinity": ANY},
               ("containers",))
LABELS_META = Obj({"labels": Map(str), "annotations": Map(str)})
POD_TEMPLATE = Obj({"metadata": LABELS_META, "spec": POD_SPEC}, ("spec",))
META = Obj({"name": str, "namespace": str, "labels": Map(str), "annotations": Map(str)}, ("name",))

# KubeRay v1.6 (ray-operator/apis/ray/v1/raycluster_types.go, rayjob_types.go)
RAY_START_PARAMS = Map(str)    # map[string]string: a YAML number here is refused by the API server
HEAD_GROUP = Obj({"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
                  "serviceType": Enum(("ClusterIP", "NodePort", "LoadBalancer")), "enableIngress": bool,
                  "headService": ANY, "resources": Map(str), "labels": Map(str)},
                 ("template",))
WORKER_GROUP = Obj({"groupName": str, "replicas": int, "minReplicas": int, "maxReplicas": int, "numOfHosts": int,
                    "idleTimeoutSeconds": int, "rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE,
                    "scaleStrategy": Obj({"workersToDelete": [str]}), "suspend": bool, "resources": Map(str),
                    "labels": Map(str)},
                   ("groupName", "minReplicas", "maxReplicas", "template"))
AUTOSCALER_OPTIONS = Obj({"upscalingMode": Enum(("Default", "Aggressive", "Conservative")),
                          "idleTimeoutSeconds": int, "version": Enum(("v1", "v2")), "resources": RESOURCES,
                          "image": str, "imagePullPolicy": Enum(("Always", "IfNotPresent", "Never")),
                          "env": [ENV_VAR], "envFrom": [ENV_FROM], "securityContext": ANY})
AUTH_OPTIONS = Obj({"mode": Enum(("disabled", "token")), "secretName": str, "enableK8sTokenAuth": bool})
RAYCLUSTER_SPEC = Obj({"rayVersion": str, "enableInTreeAutoscaling": bool, "autoscalerOptions": AUTOSCALER_OPTIONS,
                       "authOptions": AUTH_OPTIONS, "headGroupSpec": HEAD_GROUP, "workerGroupSpecs": [WORKER_GROUP],
                       "headServiceAnnotations": Map(str), "suspend": bool, "gcsFaultToleranceOptions": ANY},
                      ("headGroupSpec",))
RAYJOB_SPEC = Obj({"entrypoint": str, "clusterSelector": Map(str), "rayClusterSpec": RAYCLUSTER_SPEC,
                   "runtimeEnvYAML": str,
                   "submissionMode": Enum(("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")),
                   "shutdownAfterJobFinishes": bool, "ttlSecondsAfterFinished": int, "activeDeadlineSeconds": int,
                   "backoffLimit": int, "entrypointNumCpus": (int, float), "entrypointNumGpus": (int, float),
                   "entrypointResources": str, "submitterPodTemplate": POD_TEMPLATE,
                   "submitterConfig": Obj({"backoffLimit": int}), "metadata": Map(str), "jobId": str, "suspend": bool})


def kind(api: str, k: str, spec: Any = None, **extra) -> Obj:
    fields = {"apiVersion": Const(api), "kind": Const(k), "metadata": META, **extra}
    if spec is not None:
        fields["spec"] = spec
    return Obj(fields, ("apiVersion", "kind", "metadata") + (("spec",) if spec is not None else ()))


SCHEMAS = {
    "RayCluster": kind("ray.io/v1", "RayCluster", RAYCLUSTER_SPEC),
    "RayJob": kind("ray.io/v1", "RayJob", RAYJOB_SPEC),
    "ConfigMap": kind("v1", "ConfigMap", data=Map(str)),
    "Service": kind("v1", "Service", Obj({"selector": Map(str), "type": Enum(("ClusterIP", "NodePort", "LoadBalancer")),
                                          "ports": [Obj({"name": str, "port": int, "targetPort": INT_OR_STR,
                                                         "protocol": Enum(("TCP", "UDP"))}, ("port",))]},
                                         ("ports",))),
    "PersistentVolumeClaim": kind("v1", "PersistentVolumeClaim", Obj({
        "accessModes": [Enum(("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"))],
        "resources": Obj({"requests": Map(QUANTITY)}, ("requests",)), "storageClassName": str})),
    "Deployment": kind("apps/v1", "Deployment", Obj({
        "replicas": int, "strategy": Obj({"type": Enum(("Recreate", "RollingUpdate"))}),
        "selector": Obj({"matchLabels": Map(str)}, ("matchLabels",)), "template": POD_TEMPLATE},
        ("selector", "template"))),
}


def validate(value: Any, schema: Any, path: str) -> list[str]:
    """Errors of ``value`` against ``schema``, each naming its path in the manifest."""
    if schema is ANY:
        return []
    if isinstance(schema, Const):
        return [] if value == schema.value else [f"{path}: {value!r}, expected {schema.value!r}"]
    if isinstance(schema, Enum):
        return [] if value in schema.values else [f"{path}: {value!r} is not one of {list(schema.values)}"]
    if isinstance(schema, Obj):
        if not isinstance(value, dict):
            return [f"{path}: expected an object, got {type(value).__name__}"]
        errs = [f"{path}.{k}: unknown field (not in the schema of the fields these manifests may use)"
                for k in value if k not in schema.fields]
        errs += [f"{path}.{k}: required" for k in schema.required if k not in value]
        for k, v in value.items():
            if k in schema.fields:
                errs += validate(v, schema.fields[k], f"{path}.{k}")
        return errs
    if isinstance(schema, Map):
        if not isinstance(value, dict):
            return [f"{path}: expected a map, got {type(value).__name__}"]
        return [e for k, v in value.items() for e in validate(v, schema.values, f"{path}[{k}]")]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{path}: expected a list, got {type(value).__name__}"]
        return [e for i, v in enumerate(value) for e in validate(v, schema[0], f"{path}[{i}]")]
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:  # YAML true is not a number or a string
        return [f"{path}: {value!r} is a boolean, expected {'/'.join(t.__name__ for t in types)}"]
    if not isinstance(value, types):
        return [f"{path}: {value!r} is a {type(value).__name__}, expected {'/'.join(t.__name__ for t in types)}"]
    return []


ALL = [(f, i, o) for f, objs in manifests().items() for i, o in enumerate(objs)]


def test_the_deployment_has_a_raycluster_a_rayjob_and_an_mlflow_server():
    kinds = sorted(o["kind"] for _, _, o in ALL)
    for k in ("RayCluster", "RayJob", "Deployment", "Service", "ConfigMap"):
        assert k in kinds, f"deploy/kuberay has no {k}"


@pytest.mark.parametrize("fname,index,obj", ALL, ids=[f"{f}:{o.get('kind')}" for f, _, o in ALL])
def test_every_manifest_matches_the_api_schema(fname, index, obj):
    schema = SCHEMAS.get(obj.get("kind"))
    assert schema is not None, f"deploy/kuberay/{fname}[{index}]: kind {obj.get('kind')!r} has no schema here"
    errs = validate(obj, schema, f"{fname}:{obj['kind']}")
    assert not errs, "\n".join(errs)
    name = obj["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) and len(name) <= 63, f"{fname}: {name!r} is no DNS-1035 label"


def test_the_validator_catches_what_the_api_server_would_drop_or_refuse():
    rc = yaml.safe_load(yaml.safe_dump(one("RayCluster")))
    rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0        # a number, not a string
    rc["spec"]["workerGroupSpecs"][0]["minReplica"] = 0                  # misspelt
    rc["spec"]["authOptions"]["mode"] = "password"                       # not an AuthMode
    errs = " | ".join(validate(rc, SCHEMAS["RayCluster"], "rc"))
    assert "num-cpus]: 0 is a int" in errs and "minReplica: unknown field" in errs and "'password' is not one of" in errs


def test_kuberays_own_rules_hold():
    """The checks of KubeRay's admission code (validation.go) that concern these manifests."""
    for rc in objects("RayCluster"):
        spec = rc["spec"]
        for g in spec.get("workerGroupSpecs") or []:
            lo, hi, n = g["minReplicas"], g["maxReplicas"], g.get("replicas", g["minReplicas"])
            assert 0 <= lo <= n <= hi, f"worker group {g['groupName']}: min {lo} <= replicas {n} <= max {hi}"
            assert g["template"]["spec"]["containers"], f"worker group {g['groupName']} has no container"
        if (spec.get("authOptions") or {}).get("mode", "token") == "token" and "authOptions" in spec:
            version = tuple(int(x) for x in spec["rayVersion"].split(".")[:3])
            assert version >= (2, 52, 0), "authOptions token needs rayVersion >= 2.52.0"
    names = {rc["metadata"]["name"] for rc in objects("RayCluster")}
    for job in objects("RayJob"):
        spec = job["spec"]
        selector = spec.get("clusterSelector") or {}
        assert bool(selector) != bool(spec.get("rayClusterSpec")), "a RayJob needs rayClusterSpec or clusterSelector"
        if selector:
            assert selector.get("ray.io/cluster") in names, f"RayJob {job['metadata']['name']} selects " \
                                                            f"{selector} but deploy/kuberay has {sorted(names)}"
            assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode"
            assert not spec.get("shutdownAfterJobFinishes") and not spec.get("backoffLimit")
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
        assert isinstance(env, dict), "runtimeEnvYAML is not a YAML mapping"


# -- agreement with cluster.yaml and the lock -------------------------------------------------------
def ray_containers(rc: dict) -> list[tuple[str, dict]]:
    return [(where, t["spec"]["containers"][0]) for where, t in pod_templates(rc)]


def test_ray_version_is_the_locks():
    ray = lock_versions()["ray"]
    for rc in objects("RayCluster"):
        assert rc["spec"]["rayVersion"] == ray, f"RayCluster {rc['metadata']['name']}: rayVersion " \
                                                f"{rc['spec']['rayVersion']}, requirements.lock has ray=={ray}"


def test_head_runs_no_training_and_the_gpu_group_autoscales_from_zero():
    cfg = cluster_config()
    rc = one("RayCluster")
    spec = rc["spec"]
    assert cfg["available_node_types"][cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    assert spec.get("enableInTreeAutoscaling") is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] == int(cfg["idle_timeout_minutes"] * 60)
    gpu = [g for g in spec["workerGroupSpecs"]
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert gpu, "no worker group asks for nvidia.com/gpu"
    for g in gpu:
        assert g["minReplicas"] == 0 and g.get("replicas", 0) == 0
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    assert [g["maxReplicas"] for g in gpu] == [cfg["available_node_types"]["gpu_worker"]["max_workers"]]


def test_token_authentication_comes_from_a_secret_and_no_token_is_written_down():
    rc = one("RayCluster")
    auth = rc["spec"]["authOptions"]
    assert auth.get("mode") == "token" and auth.get("secretName")
    assert not objects("Secret"), "deploy/kuberay must not ship a Secret (a token in git)"
    for fname, objs in manifests().items():
        text = (REPO / "deploy" / "kuberay" / fname).read_text()
        assert "auth_token:" not in text.replace("--from-literal=auth_token", "")
        for obj in objs:
            for _, t in pod_templates(obj):
                for c in t["spec"]["containers"]:
                    for e in c.get("env") or []:
                        assert not (e["name"] in ("RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY") and "value" in e), \
                            f"{fname}: {e['name']} written in the manifest"


def cluster_yaml_exports() -> dict[str, str]:
    setup = " ".join(cluster_config()["setup_commands"])
    return dict(re.findall(r"export (\w+)=([^\"';]+)", setup))


def test_every_ray_pod_has_cluster_yamls_environment():
    exports = cluster_yaml_exports()
    assert {"MLFLOW_TRACKING_URI", "ORCHESTRATE_STORAGE", "RAY_AUTH_MODE"} <= set(exports)
    svc = one("Service", "mlflow")
    port = svc["spec"]["ports"][0]["port"]
    for where, c in ray_containers(one("RayCluster")):
        env = container_env(c)
        for name in exports:
            if name == "RAY_AUTH_MODE":
                continue  # set by KubeRay from authOptions on every Ray container
            assert name in env, f"RayCluster {where} container {c['name']}: no {name} (cluster.yaml exports it)"
        assert env["MLFLOW_TRACKING_URI"] == f"http://{svc['metadata']['name']}:{port}"
        assert env["ORCHESTRATE_STORAGE"].startswith("s3://")


def mlflow_command_of_cluster_yaml() -> tuple[dict[str, str], dict[str, str]]:
    """(env assignments, --flags) of cluster.yaml's ``mlflow server`` command."""
    cmd = next(c for c in cluster_config()["head_start_ray_commands"] if "mlflow server" in c)
    words = shlex.split(cmd.split(";", 1)[1] if "pkill" in cmd else cmd)
    i = words.index("mlflow")
    env = dict(w.split("=", 1) for w in words[:i] if "=" in w)
    args = words[i + 2:]
    flags = {}
    for j, w in enumerate(args):
        if w.startswith("--"):
            flags[w] = args[j + 1] if j + 1 < len(args) and not args[j + 1].startswith("--") else ""
    for k in list(flags):
        flags[k] = flags[k].split(">")[0].strip()
    return env, flags


def manifest_mlflow() -> tuple[dict, dict[str, str], dict[str, str]]:
    dep = one("Deployment", "mlflow")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["mlflow", "server"]
    args = c["args"]
    flags = {args[j]: args[j + 1] for j in range(0, len(args), 2)}
    return c, container_env(c), flags


def test_mlflow_server_runs_cluster_yamls_command():
    want_env, want_flags = mlflow_command_of_cluster_yaml()
    c, env, flags = manifest_mlflow()
    assert set(flags) == set(want_flags), (sorted(flags), sorted(want_flags))
    for k in ("--host", "--port", "--workers"):
        assert flags[k] == want_flags[k], f"{k}: {flags[k]} in mlflow.yaml, {want_flags[k]} in cluster.yaml"
    for k, v in want_env.items():
        assert env.get(k) == v, f"mlflow.yaml: {k}={env.get(k)}, cluster.yaml runs the server with {k}={v}"
    # the store URIs are settings: $(VAR) references that Kubernetes expands from the container's env
    for k in ("--backend-store-uri", "--artifacts-destination"):
        m = re.fullmatch(r"\$\((\w+)\)", flags[k])
        assert m and m.group(1) in env, f"mlflow.yaml: {k} {flags[k]} is not a $(VAR) of the container's env"
    assert env[flags["--artifacts-destination"][2:-1]].startswith("s3://")
    backend = env[flags["--backend-store-uri"][2:-1]]
    if backend.startswith("sqlite:////"):  # SQLite: on a mounted volume, not in the container's layer
        mounts = [m["mountPath"] for m in c.get("volumeMounts") or []]
        assert any(backend[len("sqlite:///"):].startswith(m + "/") for m in mounts), (backend, mounts)
    dep = one("Deployment", "mlflow")
    svc = one("Service", "mlflow")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items() and dep["spec"]["selector"]["matchLabels"] == labels
    assert svc["spec"]["ports"][0]["targetPort"] == int(flags["--port"])


def test_the_sweep_rayjob_is_a_valid_orchestrate_command_in_the_image():
    import typer

    from orchestrator.cli import app

    job = one("RayJob")
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "orchestrate", words
    cmd = typer.main.get_command(app)
    sub = cmd.get_command(None, words[1])
    assert sub is not None, f"RayJob entrypoint: no orchestrate command {words[1]!r}"
    sub.make_context(words[1], words[2:])  # parses the options as the CLI would (raises on a bad one)
    task = words[words.index("--task") + 1]
    in_image = "/home/ray/fewshot-orchestrator/"
    assert task.startswith(in_image) and (REPO / task[len(in_image):]).is_file(), task


def test_the_resource_check_sees_the_gpu_group_at_zero_pods():
    """On the head pod, ``cluster_shapes`` reads this RayCluster through the Kubernetes API and
    Ray's own conversion of it (what the KubeRay autoscaler runs): the GPU group counts while it
    has no pod, so ``--gpus-per-trial 1`` is accepted and 2 GPUs per trial refused."""
    from orchestrator.runtime.raycluster import NodeShape, ResourceError, check_resources, kuberay_shapes

    rc = yaml.safe_load(yaml.safe_dump(one("RayCluster")))
    rc["metadata"]["namespace"] = "ml"  # the API server fills it in
    types = kuberay_shapes(rc)
    assert [t.describe() for t in types] == ["1× node type headgroup (0 CPU, 0 GPU)", "8× node type gpu (8 CPU, 1 GPU)"]
    live = [NodeShape("node", 0, 0, 1)]  # the head pod alone
    check_resources(1, 1.0, 1.0, live + types, what="each trial")
    check_resources(8, 1.0, 1.0, live + types, what="each trial")
    with pytest.raises(ResourceError, match="2 GPU, but the cluster can hold 0"):
        check_resources(1, 1.0, 2.0, live + types, what="each trial")


# -- the MLflow server, started as the manifest starts it ---------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:  # not listening yet
        return 0


def test_mlflow_server_answers_through_the_service_name(tmp_path):
    """MLflow 3 refuses Host headers it does not know (DNS-rebinding protection): without the
    Service's names in MLFLOW_SERVER_ALLOWED_HOSTS, every pod's request to http://mlflow:5000
    would fail. The server runs here with the manifest's arguments and environment (stores and
    port swapped for local ones)."""
    import os

    c, env, flags = manifest_mlflow()
    port = _free_port()
    env = {**env, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "MLFLOW_ARTIFACTS_DESTINATION": str(tmp_path / "artifacts")}
    args = [a.replace("$(MLFLOW_BACKEND_STORE_URI)", env["MLFLOW_BACKEND_STORE_URI"])
             .replace("$(MLFLOW_ARTIFACTS_DESTINATION)", env["MLFLOW_ARTIFACTS_DESTINATION"]) for a in c["args"]]
    args[args.index("--port") + 1] = str(port)
    args[args.index("--host") + 1] = "127.0.0.1"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), *c["command"][1:], *args],
                            env={**os.environ, **env}, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while _get(f"{base}/health", "localhost") != 200:
            assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
            time.sleep(0.5)
        svc = one("Service", "mlflow")
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        for host in (f"mlflow:{svc['spec']['ports'][0]['port']}", "mlflow.fewshot.svc.cluster.local:5000",
                     "localhost:5000"):
            assert _get(api, host) == 200, f"Host {host} refused"
        assert _get(api, "attacker.example:5000") == 403  # the protection is still on
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=10)
