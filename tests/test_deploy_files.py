"""Dockerfile, compose stack and Kubernetes manifests agree with the gateway they run."""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import shlex
import sys
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from aiohttp import web

from gateway.app import create_app
from gateway.settings import SECTIONS, Settings, load_settings
from gateway.simulator import add_arguments, config_from_args
from tests.conftest import StartGateway, Upstream, gateway_settings
from tests.support import kustomize
from tests.support.processes import free_port

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config"
K8S = CONFIG / "k8s"
MONITORING = CONFIG / "k8s-monitoring"  # the Prometheus Operator overlay
SETTING_VARIABLES = {
    f"GATEWAY_{section.upper()}__{field.name.upper()}"
    for section, cls in SECTIONS.items()
    for field in fields(cls)
}


# --- readers ----------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    instructions = []
    for line in _logical_lines((ROOT / "Dockerfile").read_text()):
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append(pending + stripped)
        pending = ""
    return out


def build_args() -> dict[str, str]:
    """The ARGs declared before the first FROM, with their defaults."""
    found: dict[str, str] = {}
    for keyword, arguments in dockerfile():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            found[name] = default
    return found


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile()
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from:]


def exec_form(instruction: str) -> list[str]:
    """The JSON array of ``instruction`` in the final stage (HEALTHCHECK: after its CMD)."""
    (arguments,) = [args for keyword, args in final_stage() if keyword == instruction]
    if instruction == "HEALTHCHECK":
        arguments = arguments[arguments.index("CMD ") + len("CMD ") :]
    parsed = json.loads(arguments)  # exec form is a JSON array; shell form fails here
    assert isinstance(parsed, list), arguments
    assert all(isinstance(word, str) for word in parsed), arguments
    return parsed


def image_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for word in shlex.split(arguments):
                name, _, value = word.partition("=")
                env[name] = value
    return env


def compose() -> dict[str, Any]:
    stack: dict[str, Any] = yaml.safe_load((CONFIG / "compose.yaml").read_text())
    return stack


def gateway_services() -> dict[str, dict[str, Any]]:
    """The compose services that run ``isales-gateway serve`` (the image's default)."""
    return {
        name: service
        for name, service in compose()["services"].items()
        if service.get("image") == "isales-gateway:local" and "command" not in service
    }


def simulator_service() -> tuple[str, dict[str, Any]]:
    (found,) = [
        (name, service)
        for name, service in compose()["services"].items()
        if service.get("command", [None])[0] == "simulate"
    ]
    return found


def container_settings(environment: dict[str, str], **overrides: str) -> Settings:
    """What ``isales-gateway serve`` loads in the image with ``environment``."""
    env = image_environment() | {k: str(v) for k, v in environment.items()} | overrides
    return load_settings(None, env)


def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> manifest of every YAML document under config/k8s."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and "metadata" in doc:
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def deployment() -> dict[str, Any]:
    (found,) = [doc for (kind, _), doc in manifests().items() if kind == "Deployment"]
    return found


def container() -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment()["spec"]["template"]["spec"]["containers"]
    (found,) = containers
    return found


def k8s_environment(tmp_path: Path) -> dict[str, str]:
    """The container's GATEWAY_* variables: ConfigMaps, Secret example, mounted files."""
    docs = manifests()
    env: dict[str, str] = {}
    for source in container().get("envFrom", []):
        env |= docs[("ConfigMap", source["configMapRef"]["name"])]["data"]
    for variable in container().get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = docs[("Secret", ref["name"])]["stringData"][ref["key"]]
    # Mounted ConfigMaps become files; map their mount paths into tmp_path.
    volumes = {v["name"]: v for v in deployment()["spec"]["template"]["spec"]["volumes"]}
    for mount in container().get("volumeMounts", []):
        data = docs[("ConfigMap", volumes[mount["name"]]["configMap"]["name"])]["data"]
        local = tmp_path / mount["mountPath"].lstrip("/")
        local.mkdir(parents=True)
        for file_name, content in data.items():
            (local / file_name).write_text(content)
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/"):
                env[name] = str(tmp_path / value.lstrip("/"))
    return env


def get_routes(app: web.Application) -> set[str]:
    return {
        route.resource.canonical
        for route in app.router.routes()
        if route.method == "GET" and route.resource is not None
    }


# --- the image ---------------------------------------------------------------------------------


def test_the_image_is_multi_stage_on_a_slim_python_and_runs_isales_gateway_serve() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    bases = [args.split()[0] for keyword, args in dockerfile() if keyword == "FROM"]

    assert len(bases) >= 2, "a builder stage and a runtime stage"
    assert set(bases) == {"${PYTHON_IMAGE}"}, "every stage on the one pinned base"
    assert re.fullmatch(r"python:3\.11-slim@sha256:[0-9a-f]{64}", build_args()["PYTHON_IMAGE"])
    assert exec_form("ENTRYPOINT") + exec_form("CMD") == ["isales-gateway", "serve"]
    assert pyproject["project"]["scripts"]["isales-gateway"] == "gateway.cli:main"


def test_the_image_runs_as_a_numeric_non_root_user() -> None:
    (user,) = [args for keyword, args in final_stage() if keyword == "USER"]
    uid = user.split(":")[0]

    assert uid.isdigit(), "numeric, so runAsNonRoot can verify it"
    assert int(uid) > 0


def test_the_image_exposes_and_listens_on_the_same_port_with_json_logs() -> None:
    (exposed,) = [args for keyword, args in final_stage() if keyword == "EXPOSE"]
    settings = container_settings({}, GATEWAY_UPSTREAM__URL="https://vendor.example", **_KEYS)

    assert int(exposed) == settings.server.port
    assert settings.server.host == "0.0.0.0"
    assert settings.log.format == "json"


_KEYS = {"GATEWAY_UPSTREAM__AK": "ak", "GATEWAY_UPSTREAM__SK": "sk", "GATEWAY_AUTH__ENABLED": "0"}


def test_the_build_context_holds_what_the_dockerfile_copies_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = {p.removeprefix("!").rstrip("/") for p in patterns if p.startswith("!")}
    copied = [
        source
        for keyword, args in dockerfile()
        if keyword == "COPY" and "--from" not in args
        for source in args.split()[:-1]
    ]

    assert patterns[0] == "*", "everything is excluded unless named"
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") in included, f"{source} is excluded by .dockerignore"
    assert not included & {"tests", ".venv", ".git", "config"}


async def run_healthcheck(port: int) -> int:
    """The image's HEALTHCHECK command, run here against ``port``; its exit status."""
    program, *args = exec_form("HEALTHCHECK")
    assert program == "python", "the slim image has python, not curl"
    env = {"GATEWAY_SERVER__PORT": str(port)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=env, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def test_the_image_healthcheck_passes_on_a_live_gateway_and_fails_without_one(
    upstream: Upstream, start_gateway: StartGateway
) -> None:
    gateway = await start_gateway(gateway_settings(upstream.url))
    assert gateway.server.port is not None

    assert "/healthz" in " ".join(exec_form("HEALTHCHECK"))
    assert await run_healthcheck(gateway.server.port) == 0
    assert await run_healthcheck(free_port()) != 0


# --- the compose stack ---------------------------------------------------------------------


def test_compose_runs_two_gateways_redis_the_simulator_prometheus_and_grafana() -> None:
    services = compose()["services"]

    assert len(gateway_services()) == 2
    assert {"redis", "prometheus", "grafana"} <= set(services)
    assert simulator_service()


def test_every_gateway_variable_in_compose_is_a_setting_that_loads() -> None:
    for name, service in gateway_services().items():
        environment = service["environment"]
        unknown = {k for k in environment if k.startswith("GATEWAY_")} - SETTING_VARIABLES
        assert not unknown, f"{name}: not settings: {unknown}"
        settings = container_settings(environment)
        assert not settings.embedded, f"{name} must share Redis with the other replica"


def test_compose_gateways_listen_where_they_publish_and_prometheus_scrapes_them() -> None:
    targets = {
        target
        for job in yaml.safe_load((CONFIG / "prometheus" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
        for static in job["static_configs"]
        for target in static["targets"]
    }
    expected = set()
    for name, service in gateway_services().items():
        port = container_settings(service["environment"]).server.port
        (published,) = service["ports"]
        assert int(str(published).split(":")[-1]) == port, name
        expected.add(f"{name}:{port}")

    assert targets == expected


def test_compose_gateways_call_the_simulator_with_its_keys_and_share_its_redis() -> None:
    sim_name, sim = simulator_service()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sim_config = config_from_args(parser.parse_args(sim["command"][1:]))
    services = compose()["services"]

    assert sim_config.host == "0.0.0.0"
    for name, service in gateway_services().items():
        settings = container_settings(service["environment"])
        upstream = urlsplit(settings.upstream.url)
        assert (upstream.hostname, upstream.port) == (sim_name, sim_config.port), name
        assert (settings.upstream.ak, settings.upstream.sk) == (sim_config.ak, sim_config.sk)
        redis_host = urlsplit(settings.redis.url).hostname
        assert redis_host in services, f"{name}: redis.url names no compose service"
        assert redis_host in service["depends_on"], name


def test_compose_mounts_the_shipped_prometheus_and_grafana_files() -> None:
    services = compose()["services"]
    prometheus_mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    rule_files = yaml.safe_load((CONFIG / "prometheus" / "prometheus.yml").read_text())[
        "rule_files"
    ]
    grafana_mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    provider = yaml.safe_load(
        (CONFIG / "grafana" / "provisioning" / "dashboards" / "isales-gateway.yaml").read_text()
    )["providers"][0]
    (datasource,) = yaml.safe_load(
        (CONFIG / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]

    for host_path in (*prometheus_mounts, *grafana_mounts):
        assert (CONFIG / host_path).exists(), host_path
    assert prometheus_mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    for rule_file in rule_files:
        assert f"/etc/prometheus/{rule_file}" in prometheus_mounts.values(), rule_file
    assert grafana_mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    assert grafana_mounts["./grafana/dashboards"] == provider["options"]["path"]
    assert datasource["type"] == "prometheus"
    assert urlsplit(datasource["url"]).hostname == "prometheus"
    assert "9090:9090" in services["prometheus"]["ports"]


# --- Kubernetes ------------------------------------------------------------------------------


def test_every_gateway_variable_in_the_k8s_manifests_is_a_setting_that_loads(
    tmp_path: Path,
) -> None:
    env = k8s_environment(tmp_path)
    unknown = {k for k in env if k.startswith("GATEWAY_")} - SETTING_VARIABLES
    settings = container_settings(env)

    assert not unknown, f"not settings: {unknown}"
    assert not settings.embedded
    assert settings.auth.enabled, "callers authenticate in the cluster"
    secret_refs = {
        v["name"] for v in container()["env"] if "secretKeyRef" in v.get("valueFrom", {})
    }
    assert {"GATEWAY_UPSTREAM__AK", "GATEWAY_UPSTREAM__SK", "GATEWAY_REDIS__URL"} <= secret_refs


def test_k8s_probes_and_ports_match_the_gateway_routes_and_port(tmp_path: Path) -> None:
    settings = container_settings(k8s_environment(tmp_path), GATEWAY_REDIS__URL="")
    routes = get_routes(create_app(settings))
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    (service,) = [doc for (kind, _), doc in manifests().items() if kind == "Service"]

    assert ports["http"] == settings.server.port
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        check = container()[probe]["httpGet"]
        assert check["path"] == path
        assert check["path"] in routes
        assert check["port"] in ("http", settings.server.port)
    assert service["spec"]["ports"][0]["targetPort"] in ("http", settings.server.port)
    assert container().get("args", ["serve"]) == ["serve"]
    assert deployment()["spec"]["replicas"] >= 2


def test_k8s_pods_run_as_non_root_with_resources_and_a_disruption_budget() -> None:
    pod = deployment()["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (user,) = [args for keyword, args in final_stage() if keyword == "USER"]
    (pdb,) = [doc for (kind, _), doc in manifests().items() if kind == "PodDisruptionBudget"]
    (service,) = [doc for (kind, _), doc in manifests().items() if kind == "Service"]

    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert {"cpu", "memory"} <= set(container()["resources"]["requests"])
    assert "memory" in container()["resources"]["limits"]
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_kustomization_applies_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}

    assert listed == present - {"secret.example.yaml"}
    secret = yaml.safe_load((K8S / "secret.example.yaml").read_text())
    assert all(
        "REPLACE" in value or value.startswith("redis://")
        for value in secret["stringData"].values()
    )


# --- reproducible builds ---------------------------------------------------------------------


def test_the_image_installs_the_locked_dependencies_with_hashes_in_a_layer_of_their_own() -> None:
    build = dockerfile()[: max(i for i, (k, _) in enumerate(dockerfile()) if k == "FROM")]
    runs = [args for keyword, args in build if keyword == "RUN"]
    copies = [args.split()[0] for keyword, args in build if keyword == "COPY"]
    locked = (ROOT / "requirements.lock").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())

    assert copies[0] == "requirements.lock", "the dependency layer comes before the code"
    assert "--require-hashes" in runs[0]
    assert "requirements.lock" in runs[0]
    for requirement in pyproject["project"]["dependencies"]:
        name = re.split(r"[<>=\[ ]", requirement)[0].lower()
        assert re.search(rf"^{name}==[^ ]+ \\$", locked, re.MULTILINE), f"{name} is not locked"
    for line in locked.splitlines():
        assert "index-url" not in line, "no machine-specific index"
        assert "file://" not in line, "no machine-specific index"


def test_the_version_has_one_source_and_the_image_carries_oci_labels_and_a_pip_index_arg() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    labels = " ".join(args for keyword, args in final_stage() if keyword == "LABEL")
    args = {args.split("=")[0] for keyword, args in dockerfile() if keyword == "ARG"}
    env = image_environment()

    assert "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gateway.__version__"}
    for label in ("title", "version", "revision", "source", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in labels, label
    assert {"PIP_INDEX_URL", "GIT_REVISION", "VERSION", "PYTHON_IMAGE"} <= args
    assert env["ISALES_GATEWAY_REVISION"] == "${GIT_REVISION}"
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()


def test_the_package_metadata_names_license_classifiers_and_urls() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    assert project["license"]
    assert "Programming Language :: Python :: 3.11" in project["classifiers"]
    assert {"Source", "Changelog"} <= set(project["urls"])
    assert "otel" in project["optional-dependencies"]


# --- Kubernetes, built and validated --------------------------------------------------------

K8S_VERSION = "1.30"


def built(directory: Path = K8S) -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in kustomize.build(directory)}


def test_the_kustomizations_build_and_validate_against_the_kubernetes_schemas() -> None:
    for directory in (K8S, MONITORING):
        for (kind, _), doc in built(directory).items():
            if kind == "ServiceMonitor":
                continue  # a CRD: no schema in Kubernetes itself; checked below
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert ("NetworkPolicy", "isales-gateway") in built(directory)
    assert ("ServiceMonitor", "isales-gateway") in built(MONITORING)


def test_a_schema_violation_is_caught() -> None:
    broken = copy.deepcopy(built()[("Deployment", "isales-gateway")])
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_the_images_override_names_the_deployments_image() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    (built_container,) = built()[("Deployment", "isales-gateway")]["spec"]["template"]["spec"][
        "containers"
    ]

    assert container()["image"] == image["name"]
    assert built_container["image"] == f"{image['newName']}:{image['newTag']}"


def test_k8s_pods_carry_no_service_account_token_and_replace_one_at_a_time(
    tmp_path: Path,
) -> None:
    spec = deployment()["spec"]
    settings = container_settings(k8s_environment(tmp_path))

    assert spec["template"]["spec"]["automountServiceAccountToken"] is False
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert settings.limit.replicas == spec["replicas"], "limit.replicas follows the replicas"


def test_the_grace_period_covers_the_prestop_pause_and_the_drain(tmp_path: Path) -> None:
    settings = container_settings(k8s_environment(tmp_path))
    pre_stop = container()["lifecycle"]["preStop"]["exec"]["command"]
    grace = deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    assert pre_stop[0] == "sleep"
    assert grace >= int(pre_stop[1]) + settings.server.shutdown_timeout_s + 5


def test_the_network_policy_admits_the_gateway_port_and_lets_it_reach_dns_redis_and_the_vendor(
    tmp_path: Path,
) -> None:
    policy = manifests()[("NetworkPolicy", "isales-gateway")]["spec"]
    settings = container_settings(k8s_environment(tmp_path))
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    egress = {port["port"] for rule in policy["egress"] for port in rule["ports"]}
    ingress = {port["port"] for rule in policy["ingress"] for port in rule["ports"]}

    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert ingress == {settings.server.port}
    assert {53, 6379, 443, 28080} <= egress


def test_every_scrape_path_files_the_gateway_under_the_job_the_alerts_select() -> None:
    alert_jobs = set(
        re.findall(r'job="([^"]+)"', (CONFIG / "prometheus" / "alerts.yml").read_text())
    )
    annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
    monitor = built(MONITORING)[("ServiceMonitor", "isales-gateway")]["spec"]
    (service,) = [doc for (kind, _), doc in manifests().items() if kind == "Service"]
    shipped_jobs = {
        job["job_name"]
        for job in yaml.safe_load((CONFIG / "prometheus" / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
    }
    documented = set(
        re.findall(r"job_name: ([\w-]+)", (CONFIG / "prometheus" / "prometheus.yml").read_text())
    )

    assert alert_jobs == {"isales-gateway"}
    assert shipped_jobs == documented == alert_jobs
    assert annotations["prometheus.io/port"] == str(container()["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert service["metadata"]["labels"][monitor["jobLabel"]] in alert_jobs
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]


def test_compose_runs_as_many_replicas_as_limit_replicas_says() -> None:
    for service in gateway_services().values():
        settings = container_settings(service["environment"])
        assert settings.limit.replicas == len(gateway_services())


def test_the_builder_refuses_what_kustomize_refuses(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: [overlay]\n")
    (tmp_path / "overlay").mkdir()
    (tmp_path / "overlay" / "kustomization.yaml").write_text("resources: ['..']\n")
    (tmp_path / "extra.yaml").write_text("namePrefix: x-\n")

    with pytest.raises(ValueError, match="cycle"):
        kustomize.build(tmp_path / "overlay")
    with pytest.raises(ValueError, match="namePrefix"):
        kustomize.build_file(tmp_path / "extra.yaml")
