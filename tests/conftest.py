"""Shared pytest setup: the tests folder's helper modules are importable, and
command-line tests get a private prepare cache per test module."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment for CLI runs: a private prepare cache, shared by one module's runs."""
    cache = tmp_path_factory.mktemp("xdg")
    return dict(os.environ, XDG_CACHE_HOME=str(cache), PYTHONUNBUFFERED="1")
