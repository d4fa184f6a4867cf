"""docker/: the compose file, its .env.example and the Dockerfiles name only things that exist.

There is no Docker engine on the development machines, so this is what keeps the production shape honest:
every service, image, Dockerfile, copied file, port, volume, variable, Airflow option and command it names is
checked against the repository, enpipeline's Settings and CLI, and the installed Airflow.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from enpipeline.cli import build_parser
from enpipeline.config import Settings, env_name, load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
AIRFLOW_DOCKERFILE = DOCKER / "airflow.Dockerfile"
API_DOCKERFILE = DOCKER / "api.Dockerfile"

EXPECTED_SERVICES = {"postgres", "redis", "gcs", "migrate", "api", "federation", "airflow-init", "airflow-apiserver",
                     "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer", "airflow-worker"}
# ENP_* names that compose or a Dockerfile may set although they are no Settings field (none so far).
ENP_NOT_SETTINGS: dict[str, str] = {}
# Values of these .env.example variables are secrets: the example may only hold marked dummies.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|KEK|AAD|FERNET")
ALL_INTERFACES = "0.0.0.0"  # noqa: S104  # what compose files publish on, not a bind of this test
LOCAL_HOSTS = {"localhost", "127.0.0.1", ALL_INTERFACES}


# -- compose interpolation (the subset of the Compose spec this file uses, strictly) ------------------------------

_VAR = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<named>[A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|-|:\?|\?|:\+|\+)(?P<arg>.*))?", re.S)


class MissingVariable(Exception):
    pass


def _references(text: str) -> Iterator[tuple[str, str | None]]:
    """(name, operator) of every variable reference in one string; operator None for ${VAR} / $VAR."""
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        if m.group("named"):
            yield m.group("named"), None
            continue
        braced = _BRACED.fullmatch(m.group("braced"))
        assert braced, f"unsupported interpolation {m.group(0)!r} in {text!r}"
        assert "$" not in (braced.group("arg") or ""), f"nested interpolation is not supported: {text!r}"
        yield braced.group("name"), braced.group("op")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("named"):
            name, op, arg = m.group("named"), None, ""
        else:
            braced = _BRACED.fullmatch(m.group("braced"))
            assert braced
            name, op, arg = braced.group("name"), braced.group("op"), braced.group("arg") or ""
        value = env.get(name)
        if op == ":-":
            return value if value else arg
        if op == "-":
            return arg if value is None else value
        if op in (":?", "?") and (value is None or (op == ":?" and not value)):
            raise MissingVariable(f"{name}: {arg}")
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return "" if value is None else arg
        if value is None:
            raise MissingVariable(name)  # compose would substitute "" with a warning; we want it declared
        return value

    return _VAR.sub(one, text)


def walk_strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from walk_strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk_strings(value)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: interpolate_tree(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate_tree(value, env) for value in node]
    return node


def parse_env_file(path: Path) -> dict[str, str]:
    """Compose's .env format as used here: KEY=VALUE, '#' comments, optional single or double quotes."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert key not in values, f"{path.name}:{number}: {key} defined twice"
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


# -- Dockerfiles -------------------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if stripped.startswith("#"):  # a comment, also between continuation lines
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line = (pending + stripped).strip()
        pending = ""
        if line:
            instruction, _, args = line.partition(" ")
            out.append((instruction.upper(), args.strip()))
    assert not pending, f"{path.name} ends inside a continuation"
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in dockerfile_instructions(path):
        if instruction == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"{path.name}: use ENV KEY=VALUE, got {item!r}"
                env[key] = value
    return env


def dockerfile_exec_form(path: Path, instruction: str) -> list[str] | None:
    found = [args for name, args in dockerfile_instructions(path) if name == instruction]
    if not found:
        return None
    value = json.loads(found[-1])  # exec form only: a shell form would hide the real command behind sh -c
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{path.name}: {instruction} {value!r}"
    return value


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    if not path.exists():
        return []
    return [line.strip().rstrip("/") for line in path.read_text().splitlines()
            if line.strip() and not line.strip().startswith("#")]


def is_dockerignored(relative: str, patterns: list[str]) -> bool:
    parts = Path(relative).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        assert not pattern.startswith("!"), "exceptions in .dockerignore are not modelled by this test"
        bare = pattern.removeprefix("**/")
        for candidate in candidates:
            if fnmatch.fnmatchcase(candidate, pattern) or fnmatch.fnmatchcase(Path(candidate).name, bare):
                return True
    return False


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def example_env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any], example_env: dict[str, str]) -> dict[str, Any]:
    """The compose model as `docker compose --env-file docker/.env.example config` would see it."""
    return interpolate_tree(raw, example_env)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def dockerfile_of(service: Mapping[str, Any]) -> Path | None:
    build = service.get("build")
    if build is None:
        return None
    if isinstance(build, str):
        return (DOCKER / build / "Dockerfile").resolve()
    context = (DOCKER / build.get("context", ".")).resolve()
    return (context / build.get("dockerfile", "Dockerfile")).resolve()


def environment_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def runtime_env(service: Mapping[str, Any]) -> dict[str, str]:
    """What the container's processes see: the image's ENV, overridden by compose's environment."""
    dockerfile = dockerfile_of(service)
    env = dockerfile_env(dockerfile) if dockerfile else {}
    env.update(environment_of(service))
    return env


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    return [str(v) for v in value]


def shell_commands(script: str) -> Iterator[list[str]]:
    """Simple commands of a shell script (one per line, split at ||, &&, | and ;); $-words become placeholders."""
    for line in script.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        words = ["PLACEHOLDER" if "$" in word else word for word in shlex.split(line)]
        command: list[str] = []
        for word in [*words, ";"]:
            if word in ("||", "&&", "|", ";"):
                if command:
                    yield command[1:] if command[0] == "exec" else command
                command = []
            else:
                command.append(word)


def service_commands(name: str, service: Mapping[str, Any]) -> Iterator[list[str]]:
    """Every command line the service runs: its main process (image ENTRYPOINT/CMD semantics) and healthcheck."""
    dockerfile = dockerfile_of(service)
    airflow_image = dockerfile is not None and dockerfile.name == AIRFLOW_DOCKERFILE.name
    entrypoint = as_argv(service["entrypoint"]) if "entrypoint" in service else None
    command = as_argv(service.get("command"))
    if not command and dockerfile is not None:
        command = dockerfile_exec_form(dockerfile, "CMD") or []
    if entrypoint is None and dockerfile is not None:
        entrypoint = dockerfile_exec_form(dockerfile, "ENTRYPOINT")
    if entrypoint is None and airflow_image:
        # The official image's entrypoint: `bash ...` and `python ...` run as given, anything else is `airflow ...`.
        if command[:1] == ["bash"]:
            argv = command
        elif command[:1] in (["python"], ["airflow"]):
            argv = command
        else:
            argv = ["airflow", *command]
    else:
        argv = [*(entrypoint or []), *command]
    if argv[:2] in (["bash", "-c"], ["sh", "-c"], ["/bin/bash", "-c"], ["/bin/sh", "-c"]):
        yield from shell_commands(argv[2])
    elif argv[:2] != ["python", "-c"] and argv:
        yield argv
    test = (service.get("healthcheck") or {}).get("test")
    if isinstance(test, str):
        yield from shell_commands(test)
    elif isinstance(test, list) and test[:1] == ["CMD-SHELL"]:
        yield from shell_commands(test[1])
    elif isinstance(test, list) and test[:1] == ["CMD"] and test[1:3] != ["python", "-c"]:
        yield test[1:]


def all_commands(services: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, list[str]]]:
    return [(name, argv) for name, service in services.items() for argv in service_commands(name, service)]


# -- services, images, builds --------------------------------------------------------------------------------------

def test_compose_has_the_production_services(raw):
    assert set(raw) <= {"name", "services", "volumes", "networks", "secrets", "configs"} | {
        key for key in raw if key.startswith("x-")}, "unknown top-level key"
    assert EXPECTED_SERVICES <= set(raw["services"]), f"missing {EXPECTED_SERVICES - set(raw['services'])}"


def test_every_service_has_a_pinned_image_or_a_dockerfile_in_the_repo(services):
    for name, service in services.items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        dockerfile = dockerfile_of(service)
        if dockerfile is not None:
            assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
            assert dockerfile.is_relative_to(REPO), f"{name}: builds from outside the repository"
            context = (DOCKER / service["build"].get("context", ".")).resolve()
            assert context == REPO, f"{name}: the Dockerfiles COPY repo-root paths, so the context must be the repo"
        else:
            image = service["image"]
            tag = image.rsplit("/", 1)[-1].partition(":")[2]
            assert tag and tag != "latest", f"{name}: pin the image {image!r} to a version"


def test_services_sharing_an_image_build_it_the_same_way(services):
    builds: dict[str, Any] = {}
    for name, service in services.items():
        if "build" in service:
            previous = builds.setdefault(service["image"], service["build"])
            assert previous == service["build"], f"{name}: image {service['image']} is built two different ways"


def test_depends_on_names_services_with_a_matching_condition(services):
    for name, service in services.items():
        depends = service.get("depends_on") or {}
        if isinstance(depends, list):
            depends = {dep: {"condition": "service_started"} for dep in depends}
        for dep, spec in depends.items():
            assert dep in services, f"{name} depends on unknown service {dep!r}"
            assert dep != name
            condition = (spec or {}).get("condition", "service_started")
            assert condition in ("service_started", "service_healthy", "service_completed_successfully"), condition
            target = services[dep]
            if condition == "service_healthy":
                check = target.get("healthcheck") or {}
                has_check = "test" in check and not check.get("disable")
                dockerfile = dockerfile_of(target)
                image_check = dockerfile is not None and any(
                    instruction == "HEALTHCHECK" for instruction, _ in dockerfile_instructions(dockerfile))
                assert has_check or (image_check and not check.get("disable")), \
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
            if condition == "service_completed_successfully":
                assert target.get("restart") in ("no", None), f"{dep} is awaited as a one-shot job but restarts"


def test_long_running_services_have_healthchecks_and_restart(services):
    for name, service in services.items():
        if service.get("restart") == "no" or service.get("profiles"):
            continue
        if name == "gcs":  # the emulator image has no shell tools to probe with; gcs-init retries instead
            continue
        check = service.get("healthcheck") or {}
        assert check.get("test") and not check.get("disable"), f"{name}: no healthcheck"
        assert service.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: no restart policy"


# -- variables -----------------------------------------------------------------------------------------------------

def test_every_variable_is_in_env_example_or_has_a_default(raw, example_env):
    referenced: dict[str, set[str | None]] = {}
    for text in walk_strings(raw):
        for name, op in _references(text):
            referenced.setdefault(name, set()).add(op)
    without_default = {name for name, ops in referenced.items() if ops & {None, ":?", "?", ":+", "+"}}
    missing = without_default - set(example_env)
    assert not missing, f"referenced without a default and not in docker/.env.example: {sorted(missing)}"
    stale = set(example_env) - set(referenced)
    assert not stale, f"docker/.env.example defines variables compose.yaml never uses: {sorted(stale)}"


def test_compose_interpolates_with_env_example_and_fails_without_secrets(raw, example_env):
    interpolate_tree(raw, example_env)  # no MissingVariable
    without = {key: value for key, value in example_env.items() if key != "ENP_REVISION_TOKEN_KEK"}
    with pytest.raises(MissingVariable, match="ENP_REVISION_TOKEN_KEK"):
        interpolate_tree(raw, without)


def test_env_example_holds_only_marked_dummy_secrets(example_env):
    for name, value in example_env.items():
        if not SECRET_NAME.search(name) or name.startswith("AIRFLOW_SECRETS_BACKEND"):
            continue
        assert value, f"{name} is empty in .env.example: give a marked dummy so a trial starts"
        if "DUMMY" in value.upper():
            continue
        try:
            decoded = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            decoded = b""
        assert b"DUMMY" in decoded.upper(), f"{name} in .env.example does not look like a marked dummy value"


def test_real_env_file_is_kept_out_of_git_and_images():
    assert "docker/.env" in (REPO / ".gitignore").read_text().split()
    assert is_dockerignored("docker/.env", dockerignore_patterns())


def test_enp_variables_are_settings_fields(services, example_env):
    known = {env_name(f.name) for f in fields(Settings)}
    set_names = {key for service in services.values() for key in environment_of(service) if key.startswith("ENP_")}
    set_names |= {key for key in example_env if key.startswith("ENP_")}
    for dockerfile in (API_DOCKERFILE, AIRFLOW_DOCKERFILE):
        set_names |= {key for key in dockerfile_env(dockerfile) if key.startswith("ENP_")}
    unknown = set_names - known - set(ENP_NOT_SETTINGS)
    assert not unknown, f"ENP_* variables that enpipeline.config.Settings does not read: {sorted(unknown)}"


def test_enpipeline_settings_of_every_service_validate(services):
    """What each enpipeline process would load at start-up, from the image ENV plus compose's environment."""
    checked = 0
    for name, service in services.items():
        runs_enpipeline = any(argv[:1] == ["enpipeline"] for argv in service_commands(name, service))
        if not runs_enpipeline and dockerfile_of(service) != AIRFLOW_DOCKERFILE.resolve():
            continue  # postgres, redis, the emulator and its bucket job load no enpipeline settings
        env = runtime_env(service)
        load_settings(env, require_database=runs_enpipeline and "AIRFLOW_CONN_ENP_POSTGRES" not in env)
        assert env.get("ENP_ENV") == "production", f"{name}: ENP_ENV must be production"
        checked += 1
    assert checked >= 5


def test_urls_name_services_of_this_file(services):
    hosts = set(services) | LOCAL_HOSTS
    for name, service in services.items():
        for key, value in environment_of(service).items():
            for host in re.findall(r"://(?:[^@/\s\"]*@)?([A-Za-z0-9_.-]+)[:/]", value):
                assert host in hosts, f"{name}: {key} names host {host!r}, which is no service"
            if key.startswith("AIRFLOW_CONN_") and value.startswith("{"):
                host = json.loads(value).get("host")
                assert host is None or host in hosts, f"{name}: {key} names host {host!r}"


def test_database_urls_match_postgres_init_script(services):
    script = (DOCKER / "postgres-init.sh").read_text()
    created = dict(re.findall(r"CREATE DATABASE (\w+) OWNER (\w+);", script))
    roles = set(re.findall(r"CREATE ROLE (\w+) LOGIN", script))
    assert created == {"enp": "enp", "airflow": "airflow"}
    assert roles == {"enp", "airflow"}
    for service in services.values():
        for key, value in environment_of(service).items():
            for user, database in re.findall(r"postgres\w*(?:\+\w+)?://(\w+):[^@]*@postgres:5432/(\w+)", value):
                assert created.get(database) == user, f"{key}: {user}@{database} is not created by postgres-init.sh"
            if key == "AIRFLOW_CONN_ENP_POSTGRES":
                conn = json.loads(value)
                assert created.get(conn["schema"]) == conn["login"]


# -- ports, volumes, networks --------------------------------------------------------------------------------------

def published_ports(service: Mapping[str, Any]) -> list[tuple[str, int, int]]:
    """(host_ip, host_port, container_port) of each published port."""
    out = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                out.append((port.get("host_ip", ALL_INTERFACES), int(port["published"]), int(port["target"])))
            continue
        parts = str(port).split("/")[0].split(":")
        assert 1 <= len(parts) <= 3, port
        if len(parts) == 1:
            continue  # container port only: an ephemeral host port
        host_ip = parts[0] if len(parts) == 3 else ALL_INTERFACES
        out.append((host_ip, int(parts[-2]), int(parts[-1])))
    return out


def test_host_ports_are_unique_and_reach_the_listening_port(services):
    seen: dict[int, str] = {}
    for name, service in services.items():
        ports = published_ports(service)
        replicas = int((service.get("deploy") or {}).get("replicas", 1))
        assert not (ports and replicas > 1), f"{name}: {replicas} replicas cannot share one published host port"
        for _, host_port, container_port in ports:
            assert host_port not in seen, f"host port {host_port} published by {seen[host_port]} and {name}"
            seen[host_port] = name
            for argv in service_commands(name, service):
                if argv[:1] == ["enpipeline"] and "--port" in argv:
                    assert int(argv[argv.index("--port") + 1]) == container_port, f"{name}: port mismatch"
    assert {"api", "federation", "airflow-apiserver"} <= set(seen.values())


def test_volumes_and_networks_are_declared_and_bind_mounts_exist(raw, services):
    declared_volumes = set(raw.get("volumes") or {})
    declared_networks = set(raw.get("networks") or {}) | {"default"}
    used_volumes = set()
    for name, service in services.items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source, kind = volume.get("source"), volume.get("type")
            else:
                source = str(volume).split(":")[0]
                kind = "bind" if source.startswith((".", "/", "~")) else "volume"
            if kind == "bind":
                assert source.startswith("."), f"{name}: bind mount {source!r} must be relative to docker/"
                assert (DOCKER / source).exists(), f"{name}: bind-mounted {source!r} does not exist"
            elif source:
                assert source in declared_volumes, f"{name}: volume {source!r} is not declared"
                used_volumes.add(source)
        networks = service.get("networks") or []
        for network in networks if isinstance(networks, list) else list(networks):
            assert network in declared_networks, f"{name}: network {network!r} is not declared"
    assert declared_volumes == used_volumes, f"declared but unused volumes: {declared_volumes - used_volumes}"


# -- Dockerfiles ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dockerfile", sorted(DOCKER.glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_copies_files_that_exist_and_reach_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = 0
    for instruction, args in dockerfile_instructions(dockerfile):
        if instruction not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(word.startswith("--from") for word in words):
            continue
        paths = [word for word in words if not word.startswith("--")]
        assert len(paths) >= 2, f"{dockerfile.name}: {instruction} {args}"
        for source in paths[:-1]:
            assert (REPO / source).exists(), f"{dockerfile.name}: {instruction} source {source!r} does not exist"
            assert not is_dockerignored(source, patterns), f"{dockerfile.name}: {source!r} is in .dockerignore"
            copies += 1
    assert copies


def test_airflow_image_matches_the_airflow_pin():
    pins = dict(line.split("==", 1) for line in (REPO / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    froms = [args for instruction, args in dockerfile_instructions(AIRFLOW_DOCKERFILE) if instruction == "FROM"]
    assert len(froms) == 1
    match = re.fullmatch(r"apache/airflow:(?P<version>[\d.]+)-python(?P<python>3\.\d+)", froms[0])
    assert match, f"FROM {froms[0]!r} is not an official apache/airflow:<version>-python<x.y> image"
    assert match["version"] == pins["apache-airflow"], "the image's Airflow differs from requirements.txt"
    assert match["python"] == f"{sys.version_info.major}.{sys.version_info.minor}" == "3.11"
    api_from = [args for instruction, args in dockerfile_instructions(API_DOCKERFILE) if instruction == "FROM"]
    assert api_from == ["python:3.11-slim"]


def test_airflow_image_bakes_dags_and_plugins_into_its_configured_folders():
    env = dockerfile_env(AIRFLOW_DOCKERFILE)
    copies = {shlex.split(args)[-2]: shlex.split(args)[-1]
              for instruction, args in dockerfile_instructions(AIRFLOW_DOCKERFILE) if instruction == "COPY"}
    assert copies["dags"] == env["AIRFLOW__CORE__DAGS_FOLDER"]
    assert copies["plugins"] == env["AIRFLOW__CORE__PLUGINS_FOLDER"]
    assert env["ENP_KEY_DIR"].startswith(env["ENP_VAR_DIR"])


@pytest.mark.parametrize("dockerfile", [API_DOCKERFILE, AIRFLOW_DOCKERFILE], ids=lambda p: p.name)
def test_images_hold_no_secrets_and_run_unprivileged(dockerfile):
    env = dockerfile_env(dockerfile)
    leaked = [key for key in env if SECRET_NAME.search(key) or key in ("ENP_DATABASE_URL",) or
              key.startswith("AIRFLOW_CONN_") or key.endswith(("__FERNET_KEY", "__JWT_SECRET", "__SECRET_KEY"))]
    assert not leaked, f"{dockerfile.name} bakes secrets into the image: {leaked}"
    users = [args for instruction, args in dockerfile_instructions(dockerfile) if instruction == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"{dockerfile.name} runs as root"


def test_api_image_default_command_is_a_valid_enpipeline_command():
    cmd = dockerfile_exec_form(API_DOCKERFILE, "CMD")
    assert dockerfile_exec_form(API_DOCKERFILE, "ENTRYPOINT") is None
    assert cmd is not None and cmd[0] == "enpipeline"
    args = build_parser().parse_args(cmd[1:])
    assert args.command == "api" and args.host == ALL_INTERFACES
    assert any(instruction == "HEALTHCHECK" for instruction, _ in dockerfile_instructions(API_DOCKERFILE))


# -- commands ------------------------------------------------------------------------------------------------------

def test_enpipeline_commands_parse(services):
    commands = [(name, argv) for name, argv in all_commands(services) if argv[:1] == ["enpipeline"]]
    assert {"migrate", "api", "federation", "enp-cli"} <= {name for name, _ in commands}
    parser = build_parser()
    for name, argv in commands:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{name}: `{shlex.join(argv)}` is no enpipeline command: {stderr.getvalue().strip()}")
    assert ["enpipeline", "db", "migrate"] in [argv for name, argv in commands if name == "migrate"]
    assert any(argv[1:3] == ["federation", "serve"] for name, argv in commands if name == "federation")


# -- Airflow (in a subprocess: importing Airflow reads its configuration) -----------------------------------------

_AIRFLOW_PROBE = r"""
import contextlib, importlib, io, json, sys
spec = json.load(sys.stdin)
from airflow.configuration import conf
conf.load_providers_configuration()
description = conf.configuration_description
unknown = [f"AIRFLOW__{s.upper()}__{k.upper()}" for s, k in spec["options"]
           if k not in description.get(s, {}).get("options", {})]
deprecated = [f"AIRFLOW__{s.upper()}__{k.upper()}" for s, k in spec["options"]
              if any(old[:2] == (s, k) for old in conf.deprecated_options.values())]
from airflow.cli.cli_parser import get_parser
parser = get_parser()
bad = []
for argv in spec["commands"]:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            parser.parse_args(argv)
    except SystemExit:
        bad.append([argv, out.getvalue().strip().splitlines()[-1:]])
from airflow.models.connection import Connection
connections = {conn_id: Connection.from_json(value, conn_id=conn_id).conn_type
               for conn_id, value in spec["connections"].items()}
missing_objects = []
for path in spec["objects"]:
    module, _, name = path.rpartition(".")
    try:
        getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        missing_objects.append(f"{path}: {exc}")
print("PROBE " + json.dumps({"unknown": unknown, "deprecated": deprecated, "bad_commands": bad,
                             "connections": connections, "missing_objects": missing_objects}))
"""


@pytest.fixture(scope="module")
def airflow_probe(services, tmp_path_factory) -> dict[str, Any]:
    env_sets = [environment_of(s) for s in services.values() if any(k.startswith("AIRFLOW__") for k in
                                                                     environment_of(s))]
    airflow_env = {k: v for env in env_sets for k, v in env.items()}
    options = sorted({tuple(key.removeprefix("AIRFLOW__").lower().split("__", 1)) for env in env_sets
                      for key in env if key.startswith("AIRFLOW__")}
                     | {tuple(key.removeprefix("AIRFLOW__").lower().split("__", 1))
                        for key in dockerfile_env(AIRFLOW_DOCKERFILE) if key.startswith("AIRFLOW__")})
    commands = [argv[1:] for _, argv in all_commands(services) if argv[:1] == ["airflow"]]
    objects = [airflow_env["AIRFLOW__CORE__AUTH_MANAGER"]]
    for _, argv in all_commands(services):
        if argv[:1] == ["celery"] and "--app" in argv:
            objects.append(argv[argv.index("--app") + 1])
    if airflow_env.get("AIRFLOW__SECRETS__BACKEND"):
        objects.append(airflow_env["AIRFLOW__SECRETS__BACKEND"])
    spec = {"options": options, "commands": commands, "objects": objects,
            "connections": {key.removeprefix("AIRFLOW_CONN_").lower(): value
                            for key, value in airflow_env.items() if key.startswith("AIRFLOW_CONN_")}}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_", "AIRFLOW__"))}
    env["AIRFLOW_HOME"] = str(tmp_path_factory.mktemp("airflow-home"))
    # The CLI groups of the executor and auth manager (celery, users) exist only when they are configured.
    for key in ("AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__AUTH_MANAGER"):
        env[key] = airflow_env[key]
    result = subprocess.run([sys.executable, "-c", _AIRFLOW_PROBE], input=json.dumps(spec), env=env,
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, f"Airflow probe failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    report = json.loads(lines[-1].removeprefix("PROBE "))
    report["spec"] = spec
    return report


def test_every_airflow_option_exists_in_airflow_config(airflow_probe):
    assert len(airflow_probe["spec"]["options"]) >= 15
    assert not airflow_probe["unknown"], f"options Airflow does not know: {airflow_probe['unknown']}"
    assert not airflow_probe["deprecated"], f"deprecated option names: {airflow_probe['deprecated']}"


def test_every_airflow_command_exists(airflow_probe):
    commands = airflow_probe["spec"]["commands"]
    for expected in (["api-server"], ["scheduler"], ["dag-processor"], ["triggerer"], ["celery", "worker"],
                     ["db", "migrate"]):
        assert expected in commands
    assert any(argv[:2] == ["users", "create"] for argv in commands)
    assert not airflow_probe["bad_commands"], f"not airflow commands: {airflow_probe['bad_commands']}"
    assert not airflow_probe["missing_objects"], airflow_probe["missing_objects"]


def test_airflow_connections_are_the_ones_the_hooks_read(airflow_probe):
    from plugins.enp_hooks import BLOBSTORE_CONN_ID, GCP_CONN_TYPE, POSTGRES_CONN_ID

    assert airflow_probe["connections"] == {POSTGRES_CONN_ID: "postgres", BLOBSTORE_CONN_ID: GCP_CONN_TYPE}


def test_airflow_components_share_one_configuration(services):
    airflow_services = {name: s for name, s in services.items() if dockerfile_of(s) == AIRFLOW_DOCKERFILE.resolve()}
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer",
            "airflow-worker"} <= set(airflow_services)
    shared = ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
              "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CELERY__BROKER_URL")
    for key in shared:
        values = {environment_of(s).get(key) for s in airflow_services.values()}
        assert len(values) == 1 and None not in values, f"{key} differs between Airflow components"
    workers = services["airflow-worker"]
    assert int((workers.get("deploy") or {}).get("replicas", 1)) >= 2
    env = environment_of(workers)
    slots = int(env["AIRFLOW__CELERY__WORKER_CONCURRENCY"]) * int(workers["deploy"]["replicas"])
    assert int(env["AIRFLOW__CORE__PARALLELISM"]) >= slots, "parallelism below the worker slots wastes workers"
