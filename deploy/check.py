#!/usr/bin/env python3
"""Checks the deployment files without pulling an image or starting a cluster.

    python3 deploy/check.py PATH/TO/courier

- every YAML file parses (compose, Kubernetes);
- every courier invocation in them (compose commands, Kubernetes args, systemd ExecStart, the
  Dockerfile's CMD) names a real subcommand and only flags its `--help` lists;
- every COURIER_* variable they set is a flag's `[env: …]` or a settings key of deploy/courier.toml
  (COURIER_SECTION__KEY) or deploy/edge.toml (COURIER_EDGE_KEY, COURIER_EDGE_SECTION__KEY), and every AWS_* one is among those
  `--blobs` names;
- `systemd-analyze verify` accepts the units (run against the given binary);
- the Kubernetes manifests match their API schemas (kubernetes-validate, from PyPI).

Exits non-zero with one line per problem.
"""

import json
import re
import shlex
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
problems: list[str] = []


def problem(where: str, what: str) -> None:
    problems.append(f"{where}: {what}")


def help_text(binary: str, sub: str) -> str | None:
    run = subprocess.run([binary, sub, "--help"], capture_output=True, text=True)
    return run.stdout if run.returncode == 0 else None


def settings_keys() -> tuple[set[str], set[str]]:
    """COURIER_* names the two settings files allow (nested keys joined by a double underscore)."""
    serve, edge = set(), set()

    def walk(table: dict, path: list[str], prefix: str, names: set[str]) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value, path + [key], prefix, names)
            else:
                names.add(prefix + "__".join(path + [key]).upper())

    walk(tomllib.loads((DEPLOY / "courier.toml").read_text()), [], "COURIER_", serve)
    walk(tomllib.loads((DEPLOY / "edge.toml").read_text()), [], "COURIER_EDGE_", edge)
    return serve, edge


def main() -> int:
    binary = sys.argv[1] if len(sys.argv) > 1 else "courier"
    top = subprocess.run([binary, "--help"], capture_output=True, text=True, check=True).stdout
    subcommands = set(re.findall(r"^  ([a-z-]+)  ", top, re.M)) - {"help"}
    helps = {sub: help_text(binary, sub) for sub in subcommands}
    env_in_help = {name for text in helps.values() if text for name in re.findall(r"\[env: ([A-Z0-9_]+)\]", text)}
    aws_names = {name for text in helps.values() if text for name in re.findall(r"\bAWS_[A-Z_]+\b", text)}
    serve_keys, edge_keys = settings_keys()

    def check_invocation(where: str, args: list[str]) -> None:
        if not args or args[0] not in subcommands:
            return problem(where, f"not a courier subcommand: {args[:1]}")
        text = helps[args[0]] or ""
        for arg in args[1:]:
            if arg.startswith("--"):
                flag = arg.split("=", 1)[0]
                if not re.search(rf"(^|\s){re.escape(flag)}[\s,=]", text, re.M):
                    problem(where, f"`courier {args[0]}` has no flag {flag}")

    def check_env(where: str, names) -> None:
        for name in names:
            if name.startswith("AWS_"):
                if name not in aws_names:
                    problem(where, f"{name} is not one of the S3 settings `--blobs` reads ({sorted(aws_names)})")
            elif name.startswith("COURIER_"):
                if name not in env_in_help and name not in serve_keys and name not in edge_keys:
                    problem(where, f"{name} is neither a flag's variable nor a settings key")

    # YAML: compose and Kubernetes.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if not str(service.get("image", "")).startswith("courier"):
            continue
        check_invocation(f"compose.yaml {name}", [str(a) for a in service.get("command", [])])
        check_env(f"compose.yaml {name}", service.get("environment", {}))
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc.get("kind") == "Secret":
                check_env(path.name, doc.get("stringData", {}))
            pod = doc.get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if str(container.get("image", "")).startswith("courier"):
                    where = f"{path.name} {container['name']}"
                    check_invocation(where, [str(a) for a in container.get("args", [])])
                    check_env(where, [e["name"] for e in container.get("env", [])])

    # systemd: ExecStart, the environment file, and systemd's own verdict.
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        for line in unit.read_text().splitlines():
            if line.startswith("ExecStart="):
                argv = shlex.split(line.split("=", 1)[1])
                check_invocation(unit.name, argv[1:])
    env_file = DEPLOY / "systemd" / "courier.env"
    check_env(env_file.name, [l.split("=", 1)[0] for l in env_file.read_text().splitlines() if "=" in l and not l.startswith("#")])
    with tempfile.TemporaryDirectory() as tmp:
        for unit in (DEPLOY / "systemd").glob("*.service"):
            (Path(tmp) / unit.name).write_text(unit.read_text().replace("/usr/local/bin/courier", str(Path(binary).resolve())))
        units = sorted(str(p) for p in Path(tmp).glob("*.service"))
        run = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
        for line in (run.stdout + run.stderr).splitlines():
            if line.strip():
                problem("systemd-analyze verify", line.replace(tmp + "/", ""))
        if run.returncode != 0 and not (run.stdout + run.stderr).strip():
            problem("systemd-analyze verify", f"exit status {run.returncode}")

    # The Dockerfile's default command.
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if line.startswith("CMD "):
            check_invocation("Dockerfile CMD", json.loads(line[4:]))

    # Kubernetes schemas.
    manifests = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    run = subprocess.run(["kubernetes-validate", "--strict", "--quiet", *manifests], capture_output=True, text=True)
    if run.returncode != 0:
        for line in (run.stdout + run.stderr).splitlines():
            problem("kubernetes-validate", line)

    for line in problems:
        print(line, file=sys.stderr)
    if not problems:
        print("deploy/: every file parses, every flag and variable exists, units and manifests validate")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
