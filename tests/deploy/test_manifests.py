"""The deployment files agree with the images: ports, probes, users, volumes, grace periods, image names.

The images' settings come from `docker inspect` where Docker has them built (make deploy-test builds
them), else from the final stage of their Dockerfiles, so the check runs on every machine.
"""

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
# SIGTERM to exit: the drain, then up to 5 s for the aborts to go out and up to 20 s of shutdown.
DRAIN_AFTER_S = 25


def dockerfile_config(dockerfile: Path) -> dict:
    """ENV, EXPOSE, USER, VOLUME and HEALTHCHECK of a Dockerfile's final stage, as docker inspect names them."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    last_from = max(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    config = {"Env": {}, "ExposedPorts": set(), "User": "", "Volumes": set(), "Healthcheck": None}
    for line in lines[last_from + 1 :]:
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "ENV":
            config["Env"].update(pair.split("=", 1) for pair in shlex.split(rest))
        elif instruction == "EXPOSE":
            config["ExposedPorts"].update(f"{port}/tcp" for port in rest.split())
        elif instruction == "USER":
            config["User"] = rest.strip()
        elif instruction == "VOLUME":
            config["Volumes"].update(json.loads(rest))
        elif instruction == "HEALTHCHECK":
            config["Healthcheck"] = json.loads(rest[rest.index("CMD") + 3 :])
    return config


def inspected_config(image: str) -> dict | None:
    """The same fields from `docker inspect`; None without Docker or without the image."""
    if shutil.which("docker") is None:
        return None
    result = subprocess.run(["docker", "image", "inspect", image], capture_output=True, text=True)
    if result.returncode != 0:
        return None
    config = json.loads(result.stdout)[0]["Config"]
    return {
        "Env": dict(e.split("=", 1) for e in config.get("Env") or []),
        "ExposedPorts": set(config.get("ExposedPorts") or {}),
        "User": config.get("User", ""),
        "Volumes": set(config.get("Volumes") or {}),
        "Healthcheck": (config.get("Healthcheck") or {}).get("Test", [None, None])[1:] or None,
    }


def image_config(image: str, dockerfile: str) -> dict:
    return inspected_config(image) or dockerfile_config(DEPLOY / dockerfile)


def k8s(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def workload(name: str, kind: str) -> dict:
    return next(doc for doc in k8s(name) if doc["kind"] == kind)


def config_map(name: str) -> dict[str, str]:
    return next(doc for doc in k8s("config.yaml") if doc["metadata"]["name"] == name)["data"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def seconds(duration: str) -> float:
    return float(duration.removesuffix("s"))


def test_the_dockerfile_reader_agrees_with_docker_where_an_image_is_built():
    built = inspected_config("sfllm-gateway:0.1.0")
    if built is None:
        pytest.skip("no Docker or no sfllm-gateway:0.1.0 image (make deploy-test builds it)")
    parsed = dockerfile_config(DEPLOY / "Dockerfile.gateway")
    assert parsed["ExposedPorts"] == built["ExposedPorts"]
    assert parsed["User"] == built["User"]
    unexpanded = {k for k, v in parsed["Env"].items() if "$" in v}  # PATH=/opt/venv/bin:$PATH
    assert {k: v for k, v in parsed["Env"].items() if k not in unexpanded}.items() <= built["Env"].items()
    assert all(built["Env"][k].startswith(parsed["Env"][k].split("$")[0]) for k in unexpanded)
    assert parsed["Healthcheck"] == built["Healthcheck"]


def test_worker_statefulset_matches_the_worker_image():
    image = image_config("sfllm-worker:0.1.0", "Dockerfile.worker")
    grpc_port, metrics_port = int(image["Env"]["SFLLM_PORT"]), int(image["Env"]["SFLLM_METRICS_PORT"])
    assert image["ExposedPorts"] == {f"{grpc_port}/tcp", f"{metrics_port}/tcp"}
    assert "SFLLM_PORT" in " ".join(image["Healthcheck"])  # the image's check follows the port it is given

    spec = workload("worker.yaml", "StatefulSet")["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("sfllm-worker-gpu:")  # the StatefulSet asks for a GPU per pod
    assert {p["containerPort"] for p in container["ports"]} == {grpc_port, metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == grpc_port, probe
    assert spec["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert str(pod["securityContext"]["runAsUser"]) == image["User"].split(":")[0]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "cache"]
    assert mount["mountPath"] in image["Volumes"]
    drain = float(config_map("sfllm-worker")["SFLLM_DRAIN_TIMEOUT_S"])
    assert pod["terminationGracePeriodSeconds"] >= drain + DRAIN_AFTER_S
    service = next(doc for doc in k8s("worker.yaml") if doc["kind"] == "Service")
    assert {p["port"] for p in service["spec"]["ports"]} == {grpc_port, metrics_port}
    assert config_map("sfllm-gateway")["SFLLM_GATEWAY_WORKERS"] == f"{service['metadata']['name']}:{grpc_port}"


def test_gateway_deployment_matches_the_gateway_image():
    image = image_config("sfllm-gateway:0.1.0", "Dockerfile.gateway")
    port = int(image["Env"]["SFLLM_GATEWAY_PORT"])
    assert image["ExposedPorts"] == {f"{port}/tcp"}

    pod = workload("gateway.yaml", "Deployment")["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"].split(":")[0] == compose()["services"]["gateway"]["image"].split(":")[0]
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
    assert str(pod["spec"]["securityContext"]["runAsUser"]) == image["User"].split(":")[0]
    # preStop sleep, then the gateway's 30 s for in-flight streams, inside the grace period.
    pre_stop = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop + 30


def test_compose_matches_the_images_and_the_prometheus_config():
    services = compose()["services"]
    worker = image_config("sfllm-worker:0.1.0", "Dockerfile.worker")
    gateway = image_config("sfllm-gateway:0.1.0", "Dockerfile.gateway")
    assert services["worker"]["image"] == "sfllm-worker:0.1.0"
    assert services["gateway"]["image"] == "sfllm-gateway:0.1.0"
    (cache,) = [v for v in services["worker"]["volumes"] if v.startswith("worker-cache:")]
    assert cache.split(":")[1] in worker["Volumes"]
    # The drain default of the worker (30 s) and the time after it, inside the stop grace period.
    assert seconds(services["worker"]["stop_grace_period"]) >= 30 + DRAIN_AFTER_S
    assert services["gateway"]["environment"]["SFLLM_GATEWAY_WORKERS"] == f"worker:{worker['Env']['SFLLM_PORT']}"

    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert targets["sfllm-worker"] == [f"worker:{worker['Env']['SFLLM_METRICS_PORT']}"]
    assert targets["sfllm-gateway"] == [f"gateway:{gateway['Env']['SFLLM_GATEWAY_PORT']}"]


def test_the_host_network_override_changes_only_networking():
    override = yaml.safe_load((DEPLOY / "compose.host-network.yml").read_text())["services"]
    networking = {"network_mode", "environment", "volumes", "command"}
    for name, service in override.items():
        assert service["network_mode"] == "host", name
        assert set(service) <= networking, name
        for key, value in service.get("environment", {}).items():
            assert re.fullmatch(r"SFLLM_(GATEWAY_)?(HOST|PORT|METRICS_HOST|METRICS_PORT|WORKERS)", key), key
            assert value.startswith("127.0.0.1") or value.isdigit(), (key, value)
    # Its Prometheus config scrapes the ports the override gives the services.
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.host-network.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert targets["sfllm-worker"] == [f"127.0.0.1:{override['worker']['environment']['SFLLM_METRICS_PORT']}"]
    assert targets["sfllm-gateway"] == [f"127.0.0.1:{override['gateway']['environment']['SFLLM_GATEWAY_PORT']}"]
    worker_address = f"127.0.0.1:{override['worker']['environment']['SFLLM_PORT']}"
    assert override["gateway"]["environment"]["SFLLM_GATEWAY_WORKERS"] == worker_address


def test_the_tensor_parallel_overlay_gives_each_worker_pod_as_many_gpus_as_ranks():
    overlay = DEPLOY / "kubernetes-tp"
    kustomization = yaml.safe_load((overlay / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes"]  # the base, worker StatefulSet patched
    (ref,) = kustomization["patches"]
    patch = yaml.safe_load((overlay / ref["path"]).read_text())
    base = workload("worker.yaml", "StatefulSet")
    assert (patch["kind"], patch["metadata"]["name"]) == ("StatefulSet", base["metadata"]["name"])
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == base["spec"]["template"]["spec"]["containers"][0]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["SFLLM_TENSOR_PARALLEL_SIZE"]) == container["resources"]["limits"]["nvidia.com/gpu"] > 1
    assert env["NCCL_NVLS_ENABLE"] == "0"
    (shm,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    (volume,) = [v for v in patch["spec"]["template"]["spec"]["volumes"] if v["name"] == shm["name"]]
    assert volume["emptyDir"]["medium"] == "Memory"
