"""Packaging and CLI contract: the import name, the layout trap, and the subcommands of DESIGN.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from environments_operator.cli import build_parser
from environments_operator.settings import SETTINGS, SettingsError, load_settings

ROOT = Path(__file__).resolve().parents[2]


def test_operator_still_resolves_to_the_standard_library() -> None:
    import operator

    assert not (ROOT / "operator" / "__init__.py").exists()
    assert hasattr(operator, "itemgetter")
    assert "site-packages" not in (operator.__file__ or "") and "/work/" not in (operator.__file__ or "")


def test_subcommands_match_the_public_contract() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"run", "emulator", "worker", "crds", "demo"}
    run_flags = {flag for a in sub.choices["run"]._actions for flag in a.option_strings}
    assert {"--namespace", "--all-namespaces", "--standalone", "--verbose"} <= run_flags
    emulator_flags = {flag for a in sub.choices["emulator"]._actions for flag in a.option_strings}
    assert {"--host", "--port"} <= emulator_flags
    demo_flags = {flag for a in sub.choices["demo"]._actions for flag in a.option_strings}
    assert {"--sessions", "--keep-running"} <= demo_flags


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "environments_operator", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("run", "emulator", "worker", "crds"):
        assert command in result.stdout


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ENVIRONMENTS_OPERATOR_API_CONCURRENCY": "many"}, "ENVIRONMENTS_OPERATOR_API_CONCURRENCY"),
        ({"ENVIRONMENTS_OPERATOR_API_CONCURRENCY": "0"}, "must be >= 1"),
        ({"ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS": "-1"}, "ENVIRONMENTS_OPERATOR_DRIFT_INTERVAL_SECONDS"),
        ({"ENVIRONMENTS_OPERATOR_LOG_FORMAT": "xml"}, "ENVIRONMENTS_OPERATOR_LOG_FORMAT"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        load_settings(environ)


def test_settings_defaults_and_secret_hygiene() -> None:
    settings = load_settings({"ANTHROPIC_API_KEY": "sk-ant-secret-value", "ANTHROPIC_BASE_URL": "http://x"})
    assert settings.api_key == "sk-ant-secret-value"
    assert settings.worker_base_url == "http://x"
    assert settings.api_concurrency == 16
    assert "sk-ant-secret-value" not in repr(settings)
    assert all(s.env.startswith(("ANTHROPIC_", "ENVIRONMENTS_OPERATOR_")) for s in SETTINGS)
