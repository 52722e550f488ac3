"""Jinja2 templates of Lepton's HTML pages: the run report and the validation report.

:func:`render` renders one template of this folder with **autoescape on** (every value is text, never
markup; a macro's output is already escaped) and ``StrictUndefined`` (a misspelt or missing variable raises
:class:`jinja2.UndefinedError` instead of rendering as nothing). The modules that call it build a plain view
model (strings, numbers, named tuples); the templates only lay it out.

Jinja2 is imported on first use, so importing this package costs nothing: DAG files import modules that use
it, and the trainer image has no Jinja2.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

__all__ = ["environment", "render"]


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """The one environment for Lepton's templates (built once per process; templates compile once)."""
    import jinja2

    return jinja2.Environment(
        loader=jinja2.PackageLoader("lepton_tasks", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )


def render(name: str, /, **context: Any) -> str:
    """Render the template ``name`` (e.g. ``"run_report.html"``) with ``context``."""
    return environment().get_template(name).render(**context)
