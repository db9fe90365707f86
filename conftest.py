"""Repository-wide pytest set-up (tests/ and examples/).

OpenBLAS backs the CPU LAPACK calls (SVD, QR) of jax, numpy and torch here. With its default
threading on a small, busy machine an SVD is 10–20× slower (threads fight XLA's own pool), so
the tests pin it to one thread before anything imports numpy.

Compilation is most of a test's time, and many tests compile the same computation (the same
optimizer on the same small tree) from different Python functions. jax's persistent
compilation cache recognizes them by their HLO, so a test session keeps one, shared by its
pytest-xdist workers: a fresh temporary directory, removed at the end, unless
`JAX_COMPILATION_CACHE_DIR` names one to keep between runs. Its key includes the jax version,
the backend, the devices and `XLA_FLAGS`, and an executable read from it is the one the
compiler would build, so no test sees a difference. (Two workers that compile the same program
at once both write it; a reader that catches a half-written entry gets jax's warning and
compiles it itself.)
"""

import os
import shutil
import tempfile

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# The session's cache, made by its first process (the xdist controller) for the workers it
# starts: they inherit the environment.
_SESSION_CACHE = "FIRA_OPTAX_TEST_JAX_CACHE"
_MADE_HERE: list[str] = []


def pytest_configure(config):
    """Points jax's compilation cache at one directory, before any test module compiles."""
    del config
    import jax

    cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.environ.get(_SESSION_CACHE)
    if not cache_dir:
        cache_dir = tempfile.mkdtemp(prefix="fira_optax_jax_cache_")
        os.environ[_SESSION_CACHE] = cache_dir
        _MADE_HERE.append(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def pytest_unconfigure(config):
    del config
    for cache_dir in _MADE_HERE:
        shutil.rmtree(cache_dir, ignore_errors=True)
        del os.environ[_SESSION_CACHE]
