r"""How every Numba kernel of minilm is compiled, and the name it is cached under.

Numba's disk cache (``cache=True``) files a compiled function under its qualified name and first
line, and throws the entry away when that function's own source file changes. It notices nothing
else: not a compile option given by a decorator defined in another file, not a helper or an
``@overload`` inlined from another file (``minilm.cpu._math``), not a constant read from the
reference tier (the GELU's coefficients). After a change there it loads the machine code compiled
before the change. This happened: ``nogil=True`` was added to ``rows_kernel`` in ``_parallel.py``,
and the GELU and layernorm kernels, whose files had not changed, went on holding the interpreter
lock from the cache, so that ``minilm.parallel``'s two threads could not run them side by side.

``jit`` therefore compiles a kernel under its name with a tag appended, a digest of its options
and of the source of every file the kernels are built from (``minilm/cpu`` and ``reference/``).
Any change there gives every kernel a new cache entry, compiled afresh on first use; an unchanged
tree finds its entries and compiles nothing. (Entries of earlier trees stay on disk unread; delete
the cache folder to reclaim the space.)
"""
import hashlib
import os
import types

from numba import njit

import minilm.reference

__all__ = ["jit", "SOURCE_DIGEST"]

_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))          # .../minilm
# a checkout (Python started in it, or an editable install) has the project file beside the package
_INSTALLED = not os.path.isfile(os.path.join(os.path.dirname(_PACKAGE), "pyproject.toml"))


def _installed_copy_locator():
    """Numba caches a kernel beside its source file when that folder is writable. For an installed
    copy that is site-packages/minilm/cpu/__pycache__, whose files pip's RECORD does not list: a
    ``pip uninstall`` (which ``pip install -e .`` runs first) leaves that folder behind, and the
    leftover ``site-packages/minilm`` then hides the editable install (``import minilm`` finds an
    empty package). So an installed copy caches its kernels in Numba's user-wide folder instead
    (``~/.cache/numba`` on Linux, ``$XDG_CACHE_HOME/numba`` where that is set), as Numba itself
    does for a read-only install; ``NUMBA_CACHE_DIR`` still comes first, and where neither can be
    written the kernels are not cached beside the installed sources either (``minilm.backend`` then
    says to set ``NUMBA_CACHE_DIR``). The hook is Numba's list of cache locators; a Numba without
    it keeps its default."""
    from numba.core import caching

    def named(name):                        # Numba before 0.62 names the locators with a leading underscore
        return getattr(caching, name, None) or getattr(caching, "_" + name, None)

    impl, user_wide, in_tree = named("CacheImpl"), named("UserWideCacheLocator"), named("InTreeCacheLocator")
    classes = getattr(impl, "_locator_classes", None)
    if user_wide is None or in_tree is None or not isinstance(classes, list) or in_tree not in classes:
        return None

    def installed_copy_of_minilm(py_file):
        return _INSTALLED and os.path.abspath(py_file).startswith(_PACKAGE + os.sep)

    class InstalledCopyLocator(user_wide):
        @classmethod
        def from_function(cls, py_func, py_file):
            if not installed_copy_of_minilm(py_file):
                return None                                 # a checkout, or not minilm's: the next locator
            return super().from_function(py_func, py_file)

    class InTreeUnlessInstalled(in_tree):
        @classmethod
        def from_function(cls, py_func, py_file):
            return None if installed_copy_of_minilm(py_file) else super().from_function(py_func, py_file)

    classes[classes.index(in_tree)] = InTreeUnlessInstalled
    classes.insert(1, InstalledCopyLocator)                 # after NUMBA_CACHE_DIR's, before in-tree
    return InstalledCopyLocator


INSTALLED_COPY_LOCATOR = _installed_copy_locator()

DEFAULTS = {"cache": True, "nogil": True}    # every kernel: cached on disk, lets go of the interpreter lock


def source_digest(folders):
    """SHA-256 over the names and bytes of every ``.py`` file in ``folders``, in a fixed order."""
    h = hashlib.sha256()
    for folder in folders:
        for name in sorted(f for f in os.listdir(folder) if f.endswith(".py")):
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


SOURCE_DIGEST = source_digest([os.path.dirname(os.path.abspath(__file__)), *minilm.reference.__path__])


def cache_tag(options):
    """A short digest of ``options`` and ``SOURCE_DIGEST``: what a kernel's cached name ends in."""
    canonical = sorted((k, sorted(v) if isinstance(v, (set, frozenset)) else v) for k, v in options.items())
    return hashlib.sha256(f"{SOURCE_DIGEST} {canonical!r}".encode()).hexdigest()[:12]


def renamed(fn, suffix):
    """The same code under the qualified name ``fn``'s + ``suffix`` (Numba's cache files by that name)."""
    twin = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    twin.__qualname__ = fn.__qualname__ + suffix
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    return twin


def jit(fn=None, **options):
    """``numba.njit(cache=True, nogil=True, **options)``, cached under a name tagged with ``cache_tag``
    (see the module docstring). Used as ``@jit`` or ``@jit(error_model="numpy", ...)``."""
    if fn is None:
        return lambda f: jit(f, **options)
    options = {**DEFAULTS, **options}
    kernel = njit(**options)(renamed(fn, "__" + cache_tag(options)))
    kernel.jit_options = options            # what it was compiled with (the tests check the tag against it)
    return kernel
