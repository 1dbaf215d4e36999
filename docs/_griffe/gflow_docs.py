"""A Griffe extension for gflow's API reference.

gflow's reference is read by inspection (its entry points get their keyword
options at import). Inspection gives a class attribute the docstring of its value's
type ("int([x]) -> integer ..."), which is noise: gflow documents its attributes in
each class's "Attributes:" section. This extension drops those borrowed docstrings,
so that such attributes are not listed apart.
"""

from __future__ import annotations

import builtins
import inspect

import griffe

_BUILTIN_DOCSTRINGS = {
    inspect.getdoc(obj)
    for obj in vars(builtins).values()
    if isinstance(obj, type) and inspect.getdoc(obj)
}


class BorrowedDocstrings(griffe.Extension):
    """Remove the docstrings attributes inherit from the builtin type of their
    value."""

    def on_attribute_instance(self, *, attr: griffe.Attribute, **kwargs) -> None:
        if attr.docstring is not None and attr.docstring.value in _BUILTIN_DOCSTRINGS:
            attr.docstring = None
