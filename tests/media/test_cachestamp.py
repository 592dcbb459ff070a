"""media.kernels.cachestamp: a cached kernel compiles again when a source it takes a
constant from changes, not only its own file (numba's own rule). A package of two files in
a temporary directory, each step in a fresh interpreter, as worker starts are."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from media.kernels.cachestamp import KERNEL_MODULES, PYTHON_SIDE_IMPORTS

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = ("media", "workers", "pbx")

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
                         check=True, cwd=ROOT, timeout=120)
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


def module_path(name: str) -> Path:
    return ROOT / (name.replace(".", "/") + ".py")


def first_party_imports(name: str) -> set[str]:
    """The first-party modules `name` imports, anywhere in it (`from a import b` counts
    a.b when that is a module, else a)."""
    out = set()
    for node in ast.walk(ast.parse(module_path(name).read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = module_path(sub).exists() or (ROOT / sub.replace(".", "/")).is_dir()
                out.add(sub if is_module else node.module)
    return {m for m in out if m.split(".")[0] in FIRST_PARTY}


def test_every_module_with_cached_kernels_is_stamped() -> None:
    cached = set()
    for package in ("media", "workers"):
        for path in (ROOT / package).rglob("*.py"):
            if "cache=True" in path.read_text():
                cached.add(".".join(path.relative_to(ROOT).with_suffix("").parts))
    assert cached, "no cached kernel found: the scan is wrong"
    assert cached - set(KERNEL_MODULES) == set()


def test_what_a_stamped_module_imports_is_stamped_or_python_side_only() -> None:
    # numba freezes another module's constants and functions into a cached kernel; a
    # change there must change the digest, or the kernel runs stale.
    unstamped = {}
    for name in KERNEL_MODULES:
        left = first_party_imports(name) - set(KERNEL_MODULES) - set(
            PYTHON_SIDE_IMPORTS.get(name, ()))
        if left:
            unstamped[name] = sorted(left)
    assert unstamped == {}
    for name, imports in PYTHON_SIDE_IMPORTS.items():
        assert name in KERNEL_MODULES and set(imports) <= first_party_imports(name)
