"""Sphinx configuration: Markdown pages (MyST), the API reference from the docstrings.

Builds offline. `sphinx-build -W --keep-going -b html docs docs/_build/html` is part of
`scripts/test.sh`; with `nitpicky` every cross-reference to fira_optax must resolve, and
`api.md` must list every name of `fira_optax.__all__` exactly once (checked below, before
anything is read).
"""

from __future__ import annotations

import pathlib
import re

from sphinx.errors import ConfigError

import fira_optax

DOCS = pathlib.Path(__file__).resolve().parent

project = "fira_optax"
author = "fira_optax developers"
copyright = "fira_optax developers"
release = version = fira_optax.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Docstrings write code as `x` (Markdown style): render it as code, not as a cross-reference.
default_role = "literal"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Annotations are postponed (`from __future__ import annotations`): show the aliases by name
# instead of their expansion (ArrayLike alone is eight types).
autodoc_type_aliases = {
    name: name
    for name in [
        "jax.typing.ArrayLike",
        "optax.ScalarOrSchedule",
        "optax.Params",
        "optax.Updates",
        "ProjectedSpec",
        "DimensionNumbersSpec",
        "DecayMask",
        "RefreshFn",
    ]
}
autodoc_preserve_defaults = True
autodoc_class_signature = "separated"
add_module_names = False

# Every reference to fira_optax must resolve. Other libraries' objects (jax, optax, numpy,
# typing) cannot: the build is offline, without intersphinx inventories.
nitpicky = True
# Private names that signatures and docstrings mention; they are not part of the API.
nitpick_ignore = [
    ("py:class", name)
    for name in [
        "ProjectedSpec",
        "DimensionNumbersSpec",
        "DecayMask",
        "RefreshFn",
        "LeafPlan",
        "fira_optax._shapes.LeafPlan",
    ]
] + [("py:func", "default_view")]
nitpick_ignore_regex = [(r"py:.*", r"(jax|optax|chex|numpy|flax|collections|typing)\..+")]

html_theme = "furo"
html_title = f"fira_optax {release}"
html_static_path: list[str] = []


# The docstrings are written with Markdown-style code spans; reST needs a closing backquote to
# be followed by a space or punctuation (`NamedSharding`s, `gamma`×): escape the gap.
_CODE_SPAN = re.compile(r"(:\w+:)?`[^`\n]+`([\w×]?)")
# Sphinx 9 prints an aliased annotation inside a union (`optax.ScalarOrSchedule | None`) as
# the repr of its placeholder; print the alias' name.
_ALIAS_REPR = re.compile(r"TypeAliasForwardRef\('([^']*)'\)")


def _escape_glued_suffix(match: re.Match) -> str:
    span, suffix = match.group(0)[: match.start(2) - match.start()], match.group(2)
    return span + "\\ " + suffix if suffix else span


def _markdown_code_spans(app, what, name, obj, options, lines):
    lines[:] = [_CODE_SPAN.sub(_escape_glued_suffix, line) for line in lines]


def _alias_names(app, what, name, obj, options, signature, return_annotation):
    fix = lambda text: text and _ALIAS_REPR.sub(r"\1", text)
    return fix(signature), fix(return_annotation)


def setup(app):
    app.connect("autodoc-process-docstring", _markdown_code_spans)
    app.connect("autodoc-process-signature", _alias_names)


def _check_api_page_lists_all_names() -> None:
    """Fails the build when `api.md` misses a public name or documents one that is not public."""
    text = (DOCS / "api.md").read_text()
    documented = re.findall(r"^\.\. auto(?:function|class|data):: fira_optax\.(\w+)", text, re.M)
    public = list(fira_optax.__all__)
    missing = sorted(set(public) - set(documented))
    extra = sorted(set(documented) - set(public))
    twice = sorted({n for n in documented if documented.count(n) > 1})
    if missing or extra or twice:
        raise ConfigError(
            "docs/api.md must document every name of fira_optax.__all__ exactly once, in one of "
            f"its groups. Missing: {missing}; not in __all__: {extra}; listed twice: {twice}."
        )


_check_api_page_lists_all_names()
