"""Deploy files name real `enrich` commands and options (they can't be run here: no Docker engine)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from enrich.cli import app

DEPLOY = Path(__file__).parents[2] / "deploy"


def _commands() -> list[list[str]]:
    found = []
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for svc in compose["services"].values():
        if svc.get("image", "").startswith("catalogue-enrich"):
            found.append(svc["command"])
    for doc in yaml.safe_load_all((DEPLOY / "k8s" / "enrich.yaml").read_text()):
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec", {})
        found += [c["args"] for c in pod.get("containers", [])]
    return found


def test_deploy_files_have_commands():
    assert len(_commands()) >= 6


@pytest.mark.parametrize("args", _commands(), ids=lambda a: " ".join(a))
def test_deploy_command_is_accepted_by_the_cli(args):
    # click rejects unknown commands and options while parsing, before --help is honoured
    result = CliRunner().invoke(app, [*args, "--help"] if "--help" not in args else args)
    assert result.exit_code == 0, result.output


def test_image_carries_every_package():
    """The Dockerfile copies and pre-installs each top-level package the code is made of."""
    import tomllib

    root = DEPLOY.parent
    packages = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["importlinter"]["root_packages"]
    dockerfile = (root / "Dockerfile").read_text()
    prebuilt = dockerfile.split('ARG PACKAGES="', 1)[1].split('"', 1)[0].split()
    assert sorted(prebuilt) == sorted(packages)
    for package in packages:
        assert f"COPY {package} {package}" in dockerfile, package
