"""What a test module needs installed: skipped with the reason where it is missing, a failure where
the environment says it is required (CI sets QUANTBOOK_REQUIRE_MODELOPT=1, as it sets
QUANTBOOK_REQUIRE_CHROMIUM=1 for the browser tests), so a broken install can never pass as skips."""

from __future__ import annotations

import importlib
import os

import pytest

REQUIRE = {"modelopt": "QUANTBOOK_REQUIRE_MODELOPT"}


def importorskip(name: str, env: str | None = None):
    """`pytest.importorskip(name)`, unless `env` (default: REQUIRE's variable for the package) is "1":
    then the import error is raised and the module's collection fails."""
    env = env or REQUIRE.get(name.split(".")[0])
    if env and os.environ.get(env) == "1":
        try:
            return importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"{env}=1 but {name} cannot be imported: {e}") from e
    return pytest.importorskip(name)
