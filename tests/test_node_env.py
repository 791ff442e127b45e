"""One pinned node environment: requirements.lock (what scripts/setup.sh installs and the tests
pass with) is also what every cluster node runs. cluster.yaml's setup commands and deploy/Dockerfile
install torch at the same pin as scripts/setup.sh, then ``-r requirements.lock``, then the project
with ``--no-deps``, and nothing unpinned; the Ray image under both is the lock's Ray at this
Python; the KubeRay manifests run the image deploy/Dockerfile builds."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.deploy import (DOCKERFILE, REPO, classify_pip_args, cluster_commands, cluster_config, dockerfile,
                          lock_versions, manifests, pip_installs, pod_templates, project_image_tag, python_tag)


def setup_sh_torch() -> str:
    m = re.search(r"\$\{TORCH_SPEC:-([^}]+)\}", (REPO / "scripts" / "setup.sh").read_text())
    assert m, "scripts/setup.sh: no ${TORCH_SPEC:-default} found"
    return m.group(1)


def test_the_lock_pins_everything_a_node_imports():
    pins = lock_versions()
    for name in ("ray", "mlflow", "optuna", "diffusers", "pyarrow", "s3fs", "pydantic", "numpy"):
        assert name in pins, f"requirements.lock has no {name}=="
    assert "torch" not in pins  # chosen per machine kind (TORCH_SPEC), installed first


def test_cluster_yaml_installs_only_the_lock_pins_and_the_project():
    cfg = cluster_config()
    target = next(k for k, v in cfg["file_mounts"].items() if v == ".")
    installs = [classify_pip_args(a) for c in cluster_commands(cfg) for a in pip_installs(c)]
    assert installs, "cluster.yaml installs nothing"
    for info in installs:
        assert not info["unpinned"], f"cluster.yaml: pip install of unpinned {info['unpinned']} (pin it or use the lock)"
        if info["project"]:
            assert info["no_deps"], f"cluster.yaml: the project {info['project']} is installed without --no-deps " \
                                    "(its dependencies would be resolved again, unpinned)"
            assert info["project"] == [target]
    locks = [f for info in installs for f in info["lock"]]
    assert locks == [f"{target}/requirements.lock"], locks
    # torch first, then the lock, then the project
    order = ["torch" if any(p.startswith("torch==") for p in i["pins"]) else "lock" if i["lock"] else
             "project" if i["project"] else "other" for i in installs]
    assert order == ["torch", "lock", "project"], order


def test_torch_is_pinned_the_same_in_setup_sh_cluster_yaml_and_the_dockerfile():
    default = setup_sh_torch()
    assert re.fullmatch(r"torch==[\w.+]+", default), default
    cluster = [p for c in cluster_commands(cluster_config()) for a in pip_installs(c)
               for p in classify_pip_args(a)["pins"] if p.startswith("torch==")]
    assert cluster == [default]
    args, _ = dockerfile()
    assert args.get("TORCH_SPEC") == default, f"deploy/Dockerfile: ARG TORCH_SPEC={args.get('TORCH_SPEC')!r}, " \
                                              f"scripts/setup.sh installs {default}"


def test_dockerfile_builds_on_rays_image_at_the_locked_ray_and_python():
    _, instrs = dockerfile()
    froms = [rest for instr, rest in instrs if instr == "FROM"]
    ray = lock_versions()["ray"]
    assert len(froms) == 1 and froms[0].startswith(f"rayproject/ray:{ray}-{python_tag()}"), froms
    assert froms[0] == cluster_config()["docker"]["image"]  # the same base as a `ray up` node


def test_dockerfile_installs_torch_then_the_lock_then_the_project_without_deps():
    _, instrs = dockerfile()
    steps = []
    for instr, rest in instrs:
        if instr == "COPY":
            words = [w for w in shlex.split(rest) if not w.startswith("--")]
            steps.append(("copy", tuple(words[:-1])))
        elif instr == "RUN":
            for args in pip_installs(rest):
                steps.append(("pip", classify_pip_args(args)))
    pips = [s for kind, s in steps if kind == "pip"]
    assert all(not p["unpinned"] for p in pips), [p["unpinned"] for p in pips]
    kinds = ["torch" if any(x.startswith("torch==") for x in p["pins"]) else "lock" if p["lock"] else
             "project" if p["project"] else "other" for p in pips]
    assert kinds == ["torch", "lock", "project"], kinds
    assert pips[1]["lock"] == ["requirements.lock"] and pips[2]["no_deps"] and pips[2]["project"] == ["."]
    # the lock is copied alone before it is installed (its layer is rebuilt only when it changes),
    # the whole checkout only afterwards
    copies = [s for kind, s in steps if kind == "copy"]
    assert copies[0] == ("requirements.lock",) and copies[1] == (".",)
    order = [kind if kind == "pip" else s for kind, s in steps]
    assert order.index(("requirements.lock",)) < order.index("pip") < order.index((".",))


def test_dockerignore_and_rsync_exclude_keep_local_state_out():
    ignored = {l.strip() for l in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
               if l.strip() and not l.startswith("#")}
    for name in (".git", ".venv", "runs", "mlruns", "mlartifacts", "mlflow.db"):
        assert name in ignored, f"deploy/Dockerfile.dockerignore does not leave out {name}"
    assert set(cluster_config()["rsync_exclude"]) <= ignored


def test_every_pod_of_the_manifests_runs_the_image_the_dockerfile_builds():
    tag = project_image_tag()
    images = set()
    for fname, objs in manifests().items():
        for obj in objs:
            for where, template in pod_templates(obj):
                for c in template["spec"]["containers"]:
                    assert c["image"].endswith("/" + tag), \
                        f"deploy/kuberay/{fname}: {obj['kind']} {where} container {c['name']} runs {c['image']}, " \
                        f"expected REGISTRY/{tag} (deploy/Dockerfile's image)"
                    images.add(c["image"])
    assert len(images) == 1, images  # one registry path everywhere
    assert tag in DOCKERFILE.read_text()  # the build command in the Dockerfile's header names the same tag


@pytest.mark.parametrize("path", ["cluster.yaml", "deploy/Dockerfile", "scripts/setup.sh"])
def test_no_unpinned_torch_or_project_ranges(path):
    assert "torch>=" not in (REPO / path).read_text(), f"{path} installs torch by a range"
