"""Checks of the deployment files (Dockerfile, compose, Kubernetes) and scripts/fetch_weights.py.

No Docker or cluster here: the files are parsed and checked against each other and against the code they
drive (settings fields, CLI flags, health service names). The health-check commands run for real against a
local gRPC health server.
"""

from __future__ import annotations

import concurrent.futures
import fnmatch
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service.cli import build_parser
from service.config import DEFAULT_BACKBONES, Settings

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
FETCH_WEIGHTS = ROOT / "scripts" / "fetch_weights.py"
README = ROOT / "deploy" / "README.md"

PORT = 50051
SERVICE_NAME = "headserve.v1.HeadServe"  # readiness; liveness is "" (the server overall)
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


def k8s_objects() -> dict[str, dict]:
    """kind -> object, from every manifest in deploy/k8s/ except the kustomization."""
    objects: dict[str, dict] = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                assert doc["kind"] not in objects, f"two {doc['kind']} objects; the tests expect one of each"
                objects[doc["kind"]] = doc
    return objects


def compose_service() -> dict:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert list(services) == ["headserve"]
    return services["headserve"]


def container() -> dict:
    containers = k8s_objects()["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_files_parse(path: pathlib.Path) -> None:
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    assert docs and all(isinstance(doc, dict) for doc in docs)


def test_yaml_files_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in yaml_files()}
    assert {"deploy/docker-compose.yml", "deploy/k8s/deployment.yaml", "deploy/k8s/service.yaml"} <= names
    assert {"deploy/k8s/pvc.yaml", "deploy/k8s/configmap.yaml"} <= names


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
    assert containers_ports == [PORT]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in service["volumes"]}
    assert DATA_DIR in mounts
    assert mounts[DATA_DIR] in yaml.safe_load(COMPOSE.read_text())["volumes"], "use a named volume for /data"
    build = service["build"]
    assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE


def test_compose_reserves_an_nvidia_gpu() -> None:
    devices = compose_service()["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_compose_healthcheck_asks_the_headserve_service() -> None:
    check = compose_service()["healthcheck"]
    assert check["test"][0] == "CMD"
    assert SERVICE_NAME in check["test"][-1] and f":{PORT}" in check["test"][-1]


# Kubernetes ---------------------------------------------------------------------------------------------


def test_k8s_probes_use_grpc_health_on_the_port() -> None:
    c = container()
    readiness, liveness, startup = c["readinessProbe"], c["livenessProbe"], c["startupProbe"]
    assert readiness["grpc"] == {"port": PORT, "service": SERVICE_NAME}
    assert liveness["grpc"] == {"port": PORT, "service": ""}
    assert startup["grpc"]["port"] == PORT
    # Backbones load and trunks export at start: at least 10 minutes before liveness takes over.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_k8s_container_port_matches_service_and_image() -> None:
    objects = k8s_objects()
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    assert ports == {"grpc": PORT}
    (service_port,) = objects["Service"]["spec"]["ports"]
    assert service_port["name"] == "grpc" and service_port["port"] == PORT
    target = service_port["targetPort"]
    assert (ports[target] if isinstance(target, str) else target) == PORT
    assert objects["Service"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    pod_labels = objects["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert objects["Service"]["spec"]["selector"].items() <= pod_labels.items()
    selector = objects["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()


def test_k8s_deployment_has_gpu_one_replica_and_recreate() -> None:
    spec = k8s_objects()["Deployment"]["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"]["type"] == "Recreate"
    resources = container()["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    assert {"cpu", "memory"} <= resources["requests"].keys()


def test_k8s_runs_as_the_image_user() -> None:
    pod = k8s_objects()["Deployment"]["spec"]["template"]["spec"]
    stage = final_stage()
    uid = int(resolve(instruction(stage, "USER"), stage).split(":")[0])
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == uid and security["fsGroup"] == uid
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_pvc_is_mounted_at_the_data_dir() -> None:
    objects = k8s_objects()
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    claim = volumes[mounts[DATA_DIR]]["persistentVolumeClaim"]["claimName"]
    assert claim == objects["PersistentVolumeClaim"]["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in container()["env"]}
    assert env["HEADSERVE_DATA_DIR"] == DATA_DIR


def test_k8s_config_file_is_mounted_and_valid(tmp_path: pathlib.Path) -> None:
    objects = k8s_objects()
    command = entrypoint()[entrypoint().index("headserve") + 1 :] + container()["args"]
    args = build_parser().parse_args(command)
    config = pathlib.PurePosixPath(args.config)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container()["volumeMounts"]}
    source = volumes[mounts[str(config.parent)]]["configMap"]["name"]
    configmap = objects["ConfigMap"]
    assert source == configmap["metadata"]["name"]
    local = tmp_path / config.name
    local.write_text(configmap["data"][config.name])
    settings = Settings.load(local)  # unknown keys or bad values raise
    assert settings.device == "cuda"  # the pod asks for a GPU


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


# Across files -------------------------------------------------------------------------------------------


def test_every_headserve_variable_is_a_setting() -> None:
    names = set(dockerfile_env(final_stage())) | set(compose_service().get("environment", {}))
    names |= {e["name"] for e in container().get("env", [])}
    fields = set(Settings.model_fields)
    unknown = sorted(
        n for n in names if n.startswith("HEADSERVE_") and n.removeprefix("HEADSERVE_").lower() not in fields
    )
    assert not unknown, f"not settings in service/config.py: {unknown}"


@pytest.fixture
def health_server():
    """A gRPC health server on a free port; yields (port, servicer)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(grace=None)


def _run_check(command: list[str], port: int) -> int:
    command = [part.replace(f"127.0.0.1:{PORT}", f"127.0.0.1:{port}") for part in command]
    assert command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]], check=False, capture_output=True, text=True, timeout=60
    )
    return result.returncode


@pytest.mark.parametrize("source", ["Dockerfile", "compose"])
def test_healthcheck_command_reflects_serving_status(health_server, source: str) -> None:
    port, servicer = health_server
    if source == "Dockerfile":
        command = healthcheck_command()
    else:
        command = compose_service()["healthcheck"]["test"][1:]
    assert f"127.0.0.1:{PORT}" in " ".join(command)
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert _run_check(command, port) != 0
    servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert _run_check(command, port) == 0


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
