"""End-to-end test of the container deployment: `make deploy-test`.

Builds the worker, gateway and Prometheus images, starts docker-compose.yml (the file users run) with
deploy/compose.host-network.yml over it (networking only: host network, loopback addresses), waits for
every container's health check, then checks the stack as a user would:
  - a completion through the gateway with the OpenAI SDK (streamed, so that time to first token shows);
  - a call straight to the worker over gRPC (worker/client.py);
  - Prometheus scraping both targets, read from its HTTP API;
  - a restart of the worker container: timed, served from the cache volume, and re-admitted by the gateway.
Then it takes the stack down with its volumes and checks that no container, network or volume is left.
The images stay, so that the next run builds from Docker's cache.

On a machine with no registry it makes the base image first (scripts/build_base_image.sh); with no
package index inside containers it installs from the wheelhouse (scripts/build_wheelhouse.sh).
"""

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "sfllm-deploy-test"
# The addresses deploy/compose.host-network.yml gives the services.
GATEWAY_URL = "http://127.0.0.1:18000"
WORKER_TARGET = "127.0.0.1:60051"
WORKER_METRICS_URL = "http://127.0.0.1:18001"
PROMETHEUS_URL = "http://127.0.0.1:19090"
PROMPT = "<bos>The capital of France is"
MODEL = "gemma3-270m"
SERVICES = ("worker", "gateway", "prometheus")


class DeployTestError(Exception):
    """A check of the deployment failed."""


@dataclass
class Settings:
    """What to build and how: the base image, where pip takes packages from, the Prometheus image."""

    base_image: str
    pip_from: str
    prometheus_image: str
    worker_image: str = "sfllm-worker:0.1.0"
    gateway_image: str = "sfllm-gateway:0.1.0"
    timeout_s: float = 900.0


def log(message: str) -> None:
    print(f"[deploy-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(cmd: list[str], *, check: bool = True, capture: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a command from the repository root; its output, or DeployTestError with the output's tail."""
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=capture, env=env)
    if check and result.returncode != 0:
        tail = "\n".join(((result.stdout or "") + (result.stderr or "")).splitlines()[-40:])
        raise DeployTestError(f"{' '.join(cmd)} exited {result.returncode}:\n{tail}")
    return (result.stdout or "").strip()


def compose_command() -> list[str]:
    """`docker compose` (v2) where the CLI has it, else docker-compose (v1, as Debian packages it)."""
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DeployTestError("neither `docker compose` nor docker-compose is installed")


def image_size_mb(image: str) -> float:
    return int(run(["docker", "image", "inspect", "-f", "{{.Size}}", image])) / 1e6


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def http_get(url: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """Status and body of a GET; status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def wait_for(what: str, predicate, timeout_s: float, interval_s: float = 0.25) -> float:
    """Seconds until predicate() is true; DeployTestError after timeout_s."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            raise DeployTestError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


# --- building ------------------------------------------------------------------------------------


def prepare_inputs(settings: Settings) -> None:
    """The base image and the wheelhouse, made only where they are missing or stale."""
    if not image_exists(settings.base_image):
        if not settings.base_image.startswith("sfllm-base:"):
            log(f"pulling {settings.base_image}")
            run(["docker", "pull", settings.base_image])
        else:
            log(f"building {settings.base_image} with debootstrap (scripts/build_base_image.sh)")
            start = time.monotonic()
            run(["bash", "scripts/build_base_image.sh", settings.base_image], capture=False)
            log(f"base image built in {time.monotonic() - start:.0f} s")
    else:
        log(f"base image {settings.base_image}: cached ({image_size_mb(settings.base_image):.0f} MB)")
    if settings.pip_from != "wheelhouse":
        return
    wheelhouse = ROOT / "deploy" / "wheelhouse"
    stamp = wheelhouse / ".pyproject.sha256"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == digest and any(wheelhouse.glob("torch-*.whl")):
        log(f"wheelhouse: up to date with pyproject.toml ({len(list(wheelhouse.glob('*.whl')))} wheels)")
        return
    log("filling the wheelhouse (scripts/build_wheelhouse.sh)")
    run(["bash", "scripts/build_wheelhouse.sh"], capture=False, env={**os.environ, "PYTHON": sys.executable})
    stamp.write_text(digest)


def builder() -> tuple[list[str], dict[str, str]]:
    """`docker build` with BuildKit where there is one, which sends only the files the Dockerfile copies.

    BuildKit comes with the buildx plugin, or built into docker CLIs before 23. A newer CLI without buildx
    (one earlier in PATH than Debian's docker.io, say) has only the classic builder, which works too, but
    sends the whole context (the wheelhouse: ~800 MB) to the daemon for each image.
    """
    if subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0:
        return ["docker", "build"], dict(os.environ)
    for cli in dict.fromkeys(filter(None, [shutil.which("docker"), "/usr/bin/docker"])):
        version = subprocess.run([cli, "version", "-f", "{{.Client.Version}}"], capture_output=True, text=True)
        major = version.stdout.strip().split(".")[0]
        if version.returncode == 0 and major.isdigit() and int(major) < 23:
            return [cli, "build"], {**os.environ, "DOCKER_BUILDKIT": "1"}
    log("no BuildKit (no buildx plugin): the classic builder")
    return ["docker", "build"], {**os.environ, "DOCKER_BUILDKIT": "0"}


def build_images(settings: Settings) -> dict[str, float]:
    """Build the three images; seconds per image (a few seconds when Docker's layer cache holds them)."""
    args = ["--build-arg", f"BASE_IMAGE={settings.base_image}", "--build-arg", f"PIP_FROM={settings.pip_from}"]
    builds = [
        (settings.worker_image, "deploy/Dockerfile.worker"),
        (settings.gateway_image, "deploy/Dockerfile.gateway"),
    ]
    if not settings.prometheus_image.startswith("prom/"):
        builds.append((settings.prometheus_image, "deploy/Dockerfile.prometheus"))
    elif not image_exists(settings.prometheus_image):
        run(["docker", "pull", settings.prometheus_image])
    build, env = builder()
    times = {}
    for tag, dockerfile in builds:
        log(f"building {tag} from {dockerfile}")
        start = time.monotonic()
        # --network host: the Prometheus image runs apt; builds need the same networking as containers here.
        run([*build, "--network", "host", "-f", dockerfile, *args, "-t", tag, "."], env=env)
        times[tag] = time.monotonic() - start
        log(f"built {tag} in {times[tag]:.1f} s: {image_size_mb(tag):.0f} MB")
    return times


# --- the stack -----------------------------------------------------------------------------------


class Stack:
    """The compose project under test: docker-compose.yml with the host-network override."""

    def __init__(self, settings: Settings, merged_file: Path) -> None:
        self.env = {**os.environ, "SFLLM_PROMETHEUS_IMAGE": settings.prometheus_image}
        files = ["-f", "docker-compose.yml", "-f", "deploy/compose.host-network.yml"]
        config = yaml.safe_load(run([*compose_command(), *files, "config"], env=self.env))
        # Published ports mean nothing on the host's network, and docker-compose 1.x refuses the two
        # together ("host" network_mode is incompatible with port_bindings), while an override can only
        # add to a list, never empty it. So the test runs the merged file with them taken out.
        for service in config["services"].values():
            if service.get("network_mode") == "host":
                service.pop("ports", None)
        merged_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self.compose = [*compose_command(), "-p", PROJECT, "--project-directory", str(ROOT), "-f", str(merged_file)]

    def __call__(self, *args: str, check: bool = True, capture: bool = True) -> str:
        return run([*self.compose, *args], check=check, capture=capture, env=self.env)

    def container(self, service: str) -> str:
        container_id = self("ps", "-q", service)
        if not container_id:
            raise DeployTestError(f"no container for {service}")
        return container_id

    def state(self, service: str) -> dict:
        return json.loads(run(["docker", "inspect", "-f", "{{json .State}}", self.container(service)]))

    def healthy(self, service: str) -> bool:
        state = self.state(service)
        if not state.get("Running"):
            raise DeployTestError(f"{service} is not running: {state.get('Status')} (exit {state.get('ExitCode')})")
        health = state.get("Health")
        return health is None or health["Status"] == "healthy"  # no health check: running is all there is

    def wait_healthy(self, start: float, timeout_s: float) -> dict[str, float]:
        """Seconds from start (time.monotonic()) until each service's health check first passes, and until
        the worker answers SERVING itself ("worker SERVING"): the health check sees it an interval later."""
        probes = {"worker SERVING": worker_serving}
        probes |= {f"{service} healthy": functools.partial(self.healthy, service) for service in SERVICES}
        times: dict[str, float] = {}
        while len(times) < len(probes):
            for name, probe in probes.items():
                if name not in times and probe():
                    times[name] = time.monotonic() - start
                    log(f"{name} {times[name]:.1f} s after compose up")
            if time.monotonic() - start > timeout_s:
                raise DeployTestError(f"timed out waiting for health checks: passing so far {times}")
            time.sleep(0.25)
        return times

    def logs(self, service: str, since: str | None = None) -> str:
        cmd = ["docker", "logs", *(["--since", since] if since else []), self.container(service)]
        result = subprocess.run(cmd, text=True, capture_output=True)
        return result.stdout + result.stderr

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of the project still there after `down`."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = []
        for kind, cmd in (
            ("container", ["docker", "ps", "-aq", "--filter", label]),
            ("network", ["docker", "network", "ls", "-q", "--filter", label]),
            ("volume", ["docker", "volume", "ls", "-q", "--filter", label]),
        ):
            found += [f"{kind} {name}" for name in run(cmd).split()]
        return found


def worker_serving() -> bool:
    from worker.client import WorkerClient

    try:
        with WorkerClient(WORKER_TARGET, timeout=2) as client:
            return client.health() == "SERVING"
    except Exception:  # not listening yet, or NOT_SERVING mid-load
        return False


def gateway_admits_worker() -> bool:
    status, body = http_get(f"{GATEWAY_URL}/health")
    return status == 200 and json.loads(body).get("healthy_workers", 0) >= 1


def stream_completion(client, max_tokens: int = 16) -> tuple[float, str, float]:
    """(time to first token, text, total seconds) of one streamed greedy completion through the gateway."""
    start = time.monotonic()
    ttft = None
    text = ""
    for chunk in client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True
    ):
        piece = chunk.choices[0].text if chunk.choices else ""
        if piece and ttft is None:
            ttft = time.monotonic() - start
        text += piece
    if ttft is None:
        raise DeployTestError("the completion streamed no text")
    return ttft, text, time.monotonic() - start


def check_openai(figures: dict) -> str:
    """A completion through the gateway with the openai SDK: cold (first) and warm time to first token."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{GATEWAY_URL}/v1", api_key="deploy-test", max_retries=0, timeout=120)
    models = [m.id for m in client.models.list().data]
    if MODEL not in models:
        raise DeployTestError(f"/v1/models lists {models}, not {MODEL}")
    ttft, text, total = stream_completion(client)
    figures["ttft_cold_s"] = ttft
    log(f"first completion: TTFT {ttft * 1000:.0f} ms, {total:.2f} s in all: {PROMPT!r} -> {text!r}")
    warm = [stream_completion(client)[0] for _ in range(5)]
    figures["ttft_warm_s"] = statistics.median(warm)
    log(f"warm TTFT: median {figures['ttft_warm_s'] * 1000:.0f} ms of 5 ({', '.join(f'{t * 1000:.0f}' for t in warm)})")
    # The same greedy request without streaming must give the same text.
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    if full.choices[0].text != text:
        raise DeployTestError(f"non-streamed text {full.choices[0].text!r} differs from streamed {text!r}")
    if not text.strip():
        raise DeployTestError("the completion is empty")
    return text


def check_grpc(gateway_text: str) -> None:
    """A call straight to the worker's gRPC port, as a gRPC client would: same greedy text as the gateway."""
    from worker.client import WorkerClient

    with WorkerClient(WORKER_TARGET, timeout=60) as client:
        info = client.model_info()
        start = time.monotonic()
        completion = client.generate(PROMPT, max_tokens=16, temperature=0)
    log(
        f"gRPC Generate to {WORKER_TARGET} ({info.served_model_name}, {info.model_type}): "
        f"{time.monotonic() - start:.2f} s -> {completion.text!r} ({completion.finish_reason})"
    )
    if completion.text != gateway_text:
        raise DeployTestError(f"worker text {completion.text!r} differs from the gateway's {gateway_text!r}")


def prometheus_targets() -> dict[str, str]:
    status, body = http_get(f"{PROMETHEUS_URL}/api/v1/targets")
    if status != 200:
        return {}
    return {t["labels"]["job"]: t["health"] for t in json.loads(body)["data"]["activeTargets"]}


def prometheus_value(query: str) -> float | None:
    status, body = http_get(f"{PROMETHEUS_URL}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    result = json.loads(body)["data"]["result"] if status == 200 else []
    return float(result[0]["value"][1]) if result else None


def check_prometheus(figures: dict) -> None:
    """Both targets up in Prometheus' API, and the tokens the completions generated in the scraped series."""
    waited = wait_for(
        "Prometheus to scrape both targets",
        lambda: prometheus_targets() == {"sfllm-worker": "up", "sfllm-gateway": "up"},
        timeout_s=60,
    )
    log(f"Prometheus targets: {prometheus_targets()} ({waited:.1f} s after the completions)")
    queries = ("sum(sfllm:generation_tokens_total)", "sum(sfllm_gateway:generation_tokens_total)")
    wait_for(
        "the generated tokens in Prometheus",
        lambda: all((prometheus_value(q) or 0) > 0 for q in queries),
        timeout_s=30,
        interval_s=1,
    )
    for query in queries:
        log(f"Prometheus {query} = {prometheus_value(query):.0f}")
    figures["prometheus_targets"] = prometheus_targets()


def check_worker_restart(stack: Stack, settings: Settings, figures: dict) -> None:
    """Restart the worker container: timed, warm from the cache volume, and back in the gateway's pool."""
    seen_down = threading.Event()
    stop = threading.Event()

    def watch_gateway() -> None:  # the gateway must notice the worker go, not just find it there afterwards
        while not stop.is_set():
            if http_get(f"{GATEWAY_URL}/health")[0] == 503:
                seen_down.set()
            time.sleep(0.1)

    watcher = threading.Thread(target=watch_gateway, daemon=True)
    watcher.start()
    since = str(int(time.time()))
    start = time.monotonic()
    stack("restart", "-t", "60", "worker")
    started = time.monotonic()  # compose restart: the stop (a drain), then the start, straight after
    try:
        wait_for("the restarted worker to serve", worker_serving, settings.timeout_s)
        serving = time.monotonic() - started
        wait_for("the gateway to re-admit the worker", gateway_admits_worker, 120)
        admitted = time.monotonic() - started
        wait_for("the restarted worker's health check", lambda: stack.healthy("worker"), 120)
        healthy = time.monotonic() - started
    finally:
        stop.set()
        watcher.join()
    if not seen_down.is_set():
        raise DeployTestError("the gateway never reported the restarting worker down (/health stayed 200)")
    from openai import OpenAI

    client = OpenAI(base_url=f"{GATEWAY_URL}/v1", api_key="deploy-test", max_retries=0, timeout=120)
    ttft, text, _ = stream_completion(client)
    figures.update(
        restart_stop_s=started - start,
        restart_serving_s=serving,
        restart_admitted_s=admitted,
        restart_healthy_s=healthy,
        ttft_after_restart_s=ttft,
    )
    log(
        f"worker restart: stopped in {started - start:.1f} s; after its start SERVING at {serving:.1f} s, "
        f"re-admitted by the gateway at {admitted:.1f} s, health check passing at {healthy:.1f} s; "
        f"then TTFT {ttft * 1000:.0f} ms -> {text!r}"
    )
    # The second start must come from the cache volume: no conversion of the GGUF's tokenizer or weights.
    restart_logs = stack.logs("worker", since=since)
    converted = [line for line in restart_logs.splitlines() if "converting" in line or "dequantizing" in line]
    if converted:
        raise DeployTestError("the restarted worker converted the model again:\n" + "\n".join(converted))
    if serving >= figures["worker_serving_s"]:
        raise DeployTestError(
            f"the warm start ({serving:.1f} s) was no faster than the cold one "
            f"({figures['worker_serving_s']:.1f} s): is the cache volume mounted?"
        )


@contextlib.contextmanager
def running_stack(stack: Stack) -> Iterator[None]:
    """Compose up; on the way out, logs if something failed, then down with volumes and a leftover check."""
    stack("down", "-v", "--remove-orphans", check=False)  # the remains of an interrupted run
    try:
        yield
    except BaseException:
        for service in SERVICES:
            with contextlib.suppress(DeployTestError):
                print(f"--- {service} logs (last 40 lines) ---\n" + "\n".join(stack.logs(service).splitlines()[-40:]))
        raise
    finally:
        start = time.monotonic()
        stack("down", "-v", "--remove-orphans", "-t", "60", check=False)
        left = stack.leftovers()
        log(f"stack down in {time.monotonic() - start:.1f} s; left behind: {', '.join(left) or 'nothing'}")
        if left:
            raise DeployTestError(f"left behind after down: {left}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--base-image",
        default=os.environ.get("SFLLM_BASE_IMAGE", "sfllm-base:bookworm"),
        help="the images' base; sfllm-base:* is made with debootstrap when missing (default %(default)s)",
    )
    parser.add_argument(
        "--pip-from", choices=("index", "wheelhouse"), default=os.environ.get("SFLLM_PIP_FROM", "wheelhouse")
    )
    parser.add_argument(
        "--prometheus-image",
        default=os.environ.get("SFLLM_PROMETHEUS_IMAGE", "sfllm-prometheus:0.1.0"),
        help="built from deploy/Dockerfile.prometheus, or prom/... to pull the upstream one",
    )
    parser.add_argument("--timeout-s", type=float, default=900.0, help="the longest wait for a start")
    args = parser.parse_args()
    settings = Settings(args.base_image, args.pip_from, args.prometheus_image, timeout_s=args.timeout_s)
    figures: dict = {}
    total = time.monotonic()

    run(["docker", "info"])  # fails early, and clearly, without a daemon
    prepare_inputs(settings)
    figures["build_s"] = build_images(settings)
    figures["image_mb"] = {tag: image_size_mb(tag) for tag in figures["build_s"]}
    with tempfile.TemporaryDirectory(prefix="sfllm-deploy-test-") as tmp:
        stack = Stack(settings, Path(tmp) / "docker-compose.yml")
        with running_stack(stack):
            log("compose up (a cold start: the cache volume is new, so the worker converts the model)")
            start = time.monotonic()
            stack("up", "-d", "--no-build")
            figures["healthy_s"] = stack.wait_healthy(start, settings.timeout_s)
            figures["worker_serving_s"] = figures["healthy_s"].pop("worker SERVING")
            wait_for("the gateway to admit the worker", gateway_admits_worker, 60)
            text = check_openai(figures)
            check_grpc(text)
            check_prometheus(figures)
            check_worker_restart(stack, settings, figures)
            figures["completion"] = text
    figures["total_s"] = time.monotonic() - total

    print("\n== deploy-test passed ==")
    for tag, seconds in figures["build_s"].items():
        print(f"build {tag:28s} {seconds:7.1f} s   {figures['image_mb'][tag]:6.0f} MB")
    for service, seconds in figures["healthy_s"].items():
        print(f"{service + ' (its health check)':30s} {seconds:6.1f} s after compose up")
    print(f"worker SERVING after compose up (cold, new cache volume): {figures['worker_serving_s']:.1f} s")
    cold, warm = figures["ttft_cold_s"] * 1000, figures["ttft_warm_s"] * 1000
    print(f"TTFT through the gateway: first request {cold:.0f} ms, warm {warm:.0f} ms")
    print(
        f"worker restart (warm, cache volume kept): stop {figures['restart_stop_s']:.1f} s, then after the start "
        f"SERVING {figures['restart_serving_s']:.1f} s, gateway re-admits {figures['restart_admitted_s']:.1f} s, "
        f"healthy {figures['restart_healthy_s']:.1f} s; TTFT then {figures['ttft_after_restart_s'] * 1000:.0f} ms"
    )
    print(f"first completion: {PROMPT!r} -> {figures['completion']!r}")
    print(f"total {figures['total_s']:.0f} s; images kept for the build cache: {', '.join(figures['build_s'])}")


if __name__ == "__main__":
    try:
        main()
    except DeployTestError as exc:
        print(f"\n== deploy-test FAILED ==\n{exc}", file=sys.stderr)
        sys.exit(1)
