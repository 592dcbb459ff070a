"""The compiled kernels' disk cache, flushed when any source they compile in changes.

numba re-compiles a cached function when its own file changes, not when a function or a
constant it takes from another file does: a `git pull` that changes only
`media/kernels/rtpbatch.py` would leave `workers/rtploop.py`'s cached loop running the
old receive pass next to the new one (and a changed column index reading the wrong
column). So the worker (`workers.media.main`, before it warms the kernels) calls
`refresh`: one digest of every source in `KERNEL_MODULES`, kept next to each module's
cache; where it differs, that module's cached functions are flushed and compile again.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from pathlib import Path
from types import ModuleType

from numba.core.caching import FunctionCache
from numba.core.registry import CPUDispatcher

log = logging.getLogger("pbx.media")

# Every module with cached kernels, and every module they take code or constants from.
KERNEL_MODULES = (
    "media.kernels.g711",
    "media.kernels.goertzel",
    "media.kernels.vad",
    "media.kernels.rtpbatch",
    "media.kernels.recplace",
    "media.rectable",
    "workers.demux",
    "workers.rtpio",
    "workers.rtploop",
)
# First-party modules a module above imports for its Python side only (classes it builds
# or calls, no compiled code and no constant a kernel reads): a change there cannot leave
# a stale kernel. tests/media/test_cachestamp.py fails on any other first-party import
# of a module above, and on a module with cached kernels that is not above.
PYTHON_SIDE_IMPORTS = {
    # The pure-Python reference passes (`*_py`) the tests hold the kernels to.
    "media.kernels.rtpbatch": ("media.g711", "media.rtcp", "media.rtp", "media.rxaudio"),
    "workers.rtpio": ("media.legtable",),  # LegTable: the tables it reads, built in Python
    # MediaEngine finishes passes in Python; PromptCache only for `warm`.
    "workers.rtploop": ("media.engine", "media.prompts"),
}
STAMP_SUFFIX = ".sources"


def sources_digest(modules: list[ModuleType]) -> str:
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(str(module.__file__)).read_bytes())
    return h.hexdigest()


def kernel_caches(module: ModuleType) -> list[FunctionCache]:
    """The disk caches of the module's own njit functions (those with one)."""
    out = []
    for obj in vars(module).values():
        if isinstance(obj, CPUDispatcher) and obj.py_func.__module__ == module.__name__:
            cache = getattr(obj, "_cache", None)
            if isinstance(cache, FunctionCache):
                out.append(cache)
    return out


def refresh(names: tuple[str, ...] = KERNEL_MODULES) -> list[str]:
    """Flush the caches of the modules whose stamp is not the current digest (module
    text); returns their names. A cache directory that cannot be written is left to
    numba, which then cannot save there either."""
    modules = [importlib.import_module(name) for name in names]
    digest = sources_digest(modules)
    flushed = []
    for module in modules:
        caches = kernel_caches(module)
        if not caches:
            continue
        stamp = Path(caches[0].cache_path) / f"{module.__name__}{STAMP_SUFFIX}"
        try:
            if stamp.read_text() == digest:
                continue
        except OSError:
            pass  # no stamp yet: a first start, or an older tree's cache
        for cache in caches:
            cache.flush()
        flushed.append(module.__name__)
        try:
            stamp.write_text(digest)
        except OSError as exc:
            log.warning("cannot stamp the kernel cache at %s: %s", stamp, exc)
    return flushed
