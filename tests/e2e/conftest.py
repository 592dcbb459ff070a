from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import PbxSystem, ScriptedProvider, start_system


@pytest.fixture(scope="session")
def provider() -> Iterator[ScriptedProvider]:
    p = ScriptedProvider()
    yield p
    p.close()


@pytest.fixture(scope="session")
def system(tmp_path_factory: pytest.TempPathFactory, provider: ScriptedProvider
           ) -> Iterator[PbxSystem]:
    s = start_system(tmp_path_factory.mktemp("pbx"), provider)
    yield s
    s.stop()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
