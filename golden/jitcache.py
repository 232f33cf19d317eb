"""numba's on-disk cache for the golden kernels, invalidated by any golden source.

Compiling the quantile and Dropback kernels takes minutes per process, so every
``procube bench dropback`` or ``procube experiment dropback`` would pay it again.
numba can keep compiled kernels on disk (``cache=True``), but it checks only the
source file of the kernel it loads. Our kernels inline functions from other
golden modules (the fused Dropback steps inline quantile's walk and prng's
generator), so after an edit of ``quantile.py`` numba would load a stale
``dropback.py`` kernel. Here every cached kernel is stamped with one hash of all
``golden/*.py`` files instead: an edit of any of them recompiles everything.

Modules call :func:`enable` on their globals after defining their kernels. The
cache goes where numba would put it (``NUMBA_CACHE_DIR`` if set, else the
package's ``__pycache__``, else the user cache directory). ``PROCUBE_NUMBA_CACHE=0``
turns it off. This leans on numba's cache classes (``numba.core.caching``); where
they are not as expected the kernels are simply compiled in each process.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_GOLDEN = Path(__file__).resolve().parent


def source_stamp(folder: str | os.PathLike = _GOLDEN) -> str:
    """SHA-256 over the names and contents of ``folder/*.py``, in name order."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.py")):
        h.update(path.name.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _cache_classes():
    """The numba cache class that stamps with :func:`source_stamp`, or None."""
    try:
        from numba.core import caching
        locators = [caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                    caching.UserWideCacheLocator]
        impl_base, cache_base = caching.CompileResultCacheImpl, caching.FunctionCache
    except (ImportError, AttributeError):
        return None
    stamp = source_stamp()

    def stamped(base):
        return type(f"Golden{base.__name__}", (base,), {"get_source_stamp": lambda self: stamp})

    impl = type("GoldenCacheImpl", (impl_base,),
                {"_locator_classes": [stamped(b) for b in locators]})
    return type("GoldenFunctionCache", (cache_base,), {"_impl_class": impl})


_CLASS: list = []  # [the cache class or None], built on first use


def enable(namespace: dict) -> int:
    """Give every numba kernel defined in the module of ``namespace`` (its
    ``globals()``) the stamped on-disk cache. Returns how many got it."""
    if os.environ.get("PROCUBE_NUMBA_CACHE", "1") == "0":
        return 0
    if not _CLASS:
        _CLASS.append(_cache_classes())
    cls = _CLASS[0]
    if cls is None:
        return 0
    from numba.core.dispatcher import Dispatcher
    n = 0
    for obj in list(namespace.values()):
        if (isinstance(obj, Dispatcher) and obj.py_func.__module__ == namespace["__name__"]
                and obj.targetoptions.get("inline", "never") != "always"):
            try:
                obj._cache = cls(obj.py_func)
            except RuntimeError:  # no writable place for it: compile per process
                continue
            n += 1
    return n
