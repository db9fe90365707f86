"""Import the official PyTorch optimizer (`fira.FiraAdamW`) without its unused dependencies.

`fira==1.0.2` imports `transformers.utils.versions.require_version` at module level; the test
suite's `tests/_official.install_stubs` provides the stub (one place for it): run the
benchmarks from the repository root (`python -m benchmarks.NAME`), where `tests` is importable.
"""

from __future__ import annotations


def fira_adamw():
    """The official `fira.FiraAdamW` class."""
    from tests._official import install_stubs

    install_stubs()
    from fira import FiraAdamW

    return FiraAdamW
