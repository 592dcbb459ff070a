"""media.kernels.cachestamp: a cached kernel compiles again when a source it takes a
constant from changes, not only its own file (numba's own rule). A package of two files in
a temporary directory, each step in a fresh interpreter, as worker starts are."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

RUN = """
import sys
sys.path.insert(0, {root!r})
from media.kernels import cachestamp
if {refresh}:
    print("flushed", cachestamp.refresh(("kpkg.a", "kpkg.b")))
from kpkg.a import f
print("f", f(1))
"""


def start(tmp: Path, refresh: bool) -> list[str]:
    code = RUN.format(root=str(tmp), refresh=refresh)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2], timeout=120)
    return out.stdout.split("\n")[:-1]


def test_a_changed_dependency_flushes_the_callers_cache(tmp_path: Path) -> None:
    pkg = tmp_path / "kpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(
        "from numba import njit\nfrom kpkg.b import B\n\n\n"
        "@njit(cache=True)\ndef f(x):\n    return x + B\n")
    (pkg / "b.py").write_text("B = 1\n")
    assert start(tmp_path, refresh=True) == ["flushed ['kpkg.a']", "f 2"]
    assert start(tmp_path, refresh=True) == ["flushed []", "f 2"]  # stamped: loaded
    (pkg / "b.py").write_text("B = 5\n")
    assert start(tmp_path, refresh=False) == ["f 2"]  # numba alone: the stale kernel
    assert start(tmp_path, refresh=True) == ["flushed ['kpkg.a']", "f 6"]
    assert start(tmp_path, refresh=False) == ["f 6"]  # and it is what the cache holds now
