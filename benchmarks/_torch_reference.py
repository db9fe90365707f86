"""Import the official PyTorch optimizer (`fira.FiraAdamW`) without its unused dependencies.

`fira==1.0.2` imports `transformers.utils.versions.require_version` at module level; the test
suite's `tests/_official.install_stubs` provides the stub (one place for it).
"""

from __future__ import annotations

import pathlib
import sys


def fira_adamw():
    """The official `fira.FiraAdamW` class."""
    root = pathlib.Path(__file__).resolve().parent.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from tests._official import install_stubs

    install_stubs()
    from fira import FiraAdamW

    return FiraAdamW
