"""Import the official PyTorch optimizers (`fira.FiraAdamW`) without their unused deps.

`fira==1.0.2` imports `transformers.utils.versions.require_version` and `galore-torch==1.0`
imports `bitsandbytes` at module level; neither is needed on the code paths we time. We reuse
`tests/_official.install_stubs` when it exists and fall back to a minimal copy otherwise.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import types


def _available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _module(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


def _install_minimal_stubs() -> None:
    import torch

    if "transformers.utils.versions" not in sys.modules and not _available("transformers"):
        versions = _module("transformers.utils.versions", require_version=lambda *a, **k: None)
        utils = _module("transformers.utils", versions=versions, __path__=[])
        _module("transformers", utils=utils, __path__=[])
    if "bitsandbytes.optim.optimizer" not in sys.modules and not _available("bitsandbytes"):

        class Optimizer2State(torch.optim.Optimizer):
            def __init__(self, *args, **kwargs):
                raise RuntimeError("bitsandbytes is stubbed out")

        optimizer = _module("bitsandbytes.optim.optimizer", Optimizer2State=Optimizer2State)
        optim = _module("bitsandbytes.optim", optimizer=optimizer, __path__=[])
        _module("bitsandbytes", optim=optim, __path__=[])


def install_stubs() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    if (root / "tests" / "_official.py").exists():
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        try:
            from tests._official import install_stubs as official_install

            official_install()
            return
        except Exception:  # noqa: BLE001 -- someone else's helper; fall back to ours.
            pass
    _install_minimal_stubs()


def fira_adamw():
    """The official `fira.FiraAdamW` class."""
    install_stubs()
    from fira import FiraAdamW

    return FiraAdamW
