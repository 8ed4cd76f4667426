"""A Jinja sandbox whose rendering is bounded in time and size, for chat templates from untrusted manifests.

jinja2's ImmutableSandboxedEnvironment stops a template from reaching Python's internals, not from running
for ever (nested `range(100000)` loops) or from allocating gigabytes (`'a' * 2000000000`, `'{:>900000000}'`).
`BoundedEnvironment` adds, all checked *before* the work is done:

    size      every string, list or output a template builds stays under MAX_CHARS: `*`, `+`, `%`, `**` and
              `~` are intercepted, every call and filter has its arguments measured, integer arguments are at
              most MAX_INT_ARGUMENT, the known amplifiers (replace, join, format, center, indent, wordwrap,
              expandtabs) are estimated from their arguments, `range` gives at most MAX_RANGE items
    time      `render` traces the template's own code (sys.settrace in the rendering thread: works in any
              thread, no signals) and stops it after MAX_SECONDS
    files     `{% include %}`, `{% import %}` and `{% extends %}` do not parse: a chat template is one string

What breaks a bound raises TemplateTooCostly.
"""

from __future__ import annotations

import functools
import re
import sys
import time
from typing import Any, Callable, Iterable

import jinja2
import jinja2.nodes
import jinja2.runtime
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 8 << 20  # characters (or items) in any one value a template builds, and in its output
MAX_RANGE = 10_000  # items of one range(); jinja2's own sandbox allows 100000
MAX_INT_ARGUMENT = 100_000  # widths, counts and repeats passed to calls and filters
MAX_SECONDS = 2.0  # a real chat template renders in well under a millisecond
_WALK_LIMIT = 100_000  # values visited to measure one argument
_LONG_NUMBER = re.compile(r"\d{6,}")  # a format width or precision of a million or more


class TemplateTooCostly(Exception):
    """The template broke a bound of BoundedEnvironment."""


class _Deadline(Exception):
    """Raised inside the template's own frames by the tracer; becomes TemplateTooCostly."""


def measure(value: Any) -> int:
    """Characters a value stands for when rendered or joined: strings by length, containers by their items."""
    total, stack, seen = 0, [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > _WALK_LIMIT:
            raise TemplateTooCostly(f"an argument has more than {_WALK_LIMIT} items")
        if isinstance(item, (str, bytes)):
            total += len(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    return total


def _check_size(size: int, what: str) -> None:
    if size > MAX_CHARS:
        raise TemplateTooCostly(f"{what} would build {size} characters, more than {MAX_CHARS}")


def _check_arguments(name: str, args: Iterable[Any]) -> int:
    """Integer arguments bounded, string arguments without huge format widths; returns their total size."""
    total = 0
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_INT_ARGUMENT:
            raise TemplateTooCostly(f"{name}() got the integer {arg}; at most {MAX_INT_ARGUMENT} is allowed")
        total += measure(arg)
    _check_size(total, f"{name}()")
    return total


def _estimate(name: str, args: tuple, kwargs: dict) -> None:
    """Refuse a call to a known amplifier whose result would exceed MAX_CHARS (args[0] is the subject)."""
    values = [*args, *kwargs.values()]
    size = _check_arguments(name, values)
    subject = args[0] if args else None
    if name in ("format", "format_map") and isinstance(subject, str):
        if _LONG_NUMBER.search(subject):
            raise TemplateTooCostly(f"{name}() got a format string with a width of a million or more")
        _check_size(len(subject) + subject.count("{") * size, f"{name}()")
    elif name == "replace" and len(args) >= 3 and isinstance(subject, str):
        _check_size(len(subject) + (len(subject) + 1) * measure(args[2]), "replace()")
    elif name == "join" and len(args) >= 2:
        separator, items = (args[0], args[1]) if isinstance(args[0], str) else (args[1] if len(args) > 1 else "", args[0])
        count = len(items) if isinstance(items, (list, tuple, str)) else 0
        _check_size(measure(items) + count * measure(separator), "join()")
    elif name == "indent" and isinstance(subject, str):
        width = args[1] if len(args) > 1 else kwargs.get("width", 4)
        _check_size(len(subject) + (subject.count("\n") + 1) * (measure(width) if isinstance(width, str) else width),
                    "indent()")
    elif name == "wordwrap" and isinstance(subject, str):
        _check_size(len(subject) * (1 + measure(kwargs.get("wrapstring", args[3] if len(args) > 3 else "\n"))),
                    "wordwrap()")
    elif name == "expandtabs" and isinstance(subject, str):
        tab = args[1] if len(args) > 1 else kwargs.get("tabsize", 8)
        _check_size(len(subject) + subject.count("\t") * tab, "expandtabs()")


def _bounded_filter(name: str, func: Callable) -> Callable:
    @functools.wraps(func)  # keeps jinja's pass_context/pass_environment marks
    def bounded(*args, **kwargs):
        _estimate(name, tuple(a for a in args if not isinstance(a, (jinja2.runtime.Context, jinja2.Environment,
                                                                      jinja2.nodes.EvalContext))), kwargs)
        return func(*args, **kwargs)

    return bounded


class _BoundedFilters(dict):
    """environment.filters: every filter added is wrapped by _bounded_filter."""

    def __setitem__(self, name: str, func: Callable) -> None:
        super().__setitem__(name, _bounded_filter(name, func))


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise TemplateTooCostly(f"range() of {len(numbers)} items; at most {MAX_RANGE} are allowed")
    return numbers


def _bounded_concat(values: Iterable[Any]) -> str:
    """`~` and every buffered output ({% set %} blocks, macros, the template itself)."""
    pieces, total = [], 0
    for value in values:
        piece = value if isinstance(value, str) else str(value)
        total += len(piece)
        _check_size(total, "the template's output")
        pieces.append(piece)
    return "".join(pieces)


class _BoundedCodeGenerator(CodeGenerator):
    """Compiles `a ~ b` to environment.bounded_concat((a, b)) instead of jinja2's unbounded str_join."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame) -> None:
        self.write("environment.bounded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """ImmutableSandboxedEnvironment bounded in size (see the module doc); render with `render`."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})  # also keeps them from being folded at compile time
    code_generator_class = _BoundedCodeGenerator
    concat = staticmethod(_bounded_concat)
    bounded_concat = staticmethod(_bounded_concat)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        filters, self.filters = self.filters, _BoundedFilters()
        for name, func in filters.items():
            self.filters[name] = func
        self.globals["range"] = _bounded_range
        self.globals.pop("lipsum", None)  # lipsum(n) writes n paragraphs; no chat template uses it

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > 65536:
                raise TemplateTooCostly(f"{left} ** {right} is too large")
            return left**right
        sequence = isinstance(left, (str, list, tuple))
        if operator == "*":
            count, repeated = (right, left) if sequence else (left, right)
            if isinstance(count, int) and isinstance(repeated, (str, list, tuple)):
                _check_size(max(count, 0) * measure(repeated), "'*'")
            return left * right
        if operator == "+":
            if sequence and isinstance(right, (str, list, tuple)):
                _check_size(measure(left) + measure(right), "'+'")
            return left + right
        if isinstance(left, str):  # "%": old-style formatting
            if _LONG_NUMBER.search(left):
                raise TemplateTooCostly("'%' got a format string with a width of a million or more")
            size = _check_arguments("'%'", right if isinstance(right, tuple) else (right,))
            _check_size(len(left) + left.count("%") * size, "'%'")
        return left % right

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's signature)
        name = getattr(__obj, "__name__", "") or ""
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format is wrapped by the sandbox
        subject = (owner,) if isinstance(owner, (str, list, tuple, dict)) else ()
        if __obj is not _bounded_range:  # range checks its own length
            _estimate(name, (*subject, *args), kwargs)
        result = super().call(__context, __obj, *args, **kwargs)
        if isinstance(result, (str, list, tuple)):
            _check_size(len(result), f"{name}()")
        return result

    def _parse(self, source: str, name: str | None, filename: str | None) -> jinja2.nodes.Template:
        tree = super()._parse(source, name, filename)
        for kind, tag in ((jinja2.nodes.Include, "include"), (jinja2.nodes.Import, "import"),
                          (jinja2.nodes.FromImport, "from ... import"), (jinja2.nodes.Extends, "extends")):
            node = tree.find(kind)
            if node is not None:
                raise jinja2.TemplateSyntaxError(f"{{% {tag} %}} is not supported: a chat template cannot load other "
                                                 "templates", node.lineno, name, filename)
        return tree


def render(template: jinja2.Template, **variables: Any) -> str:
    """Render a template compiled by a BoundedEnvironment within MAX_SECONDS and MAX_CHARS."""
    deadline = time.monotonic() + MAX_SECONDS
    code_names = {"<template>"}

    def local(frame, event, arg):
        if time.monotonic() > deadline:
            raise _Deadline
        return local

    def tracer(frame, event, arg):  # only the template's own frames get a line tracer
        if frame.f_code.co_filename in code_names:
            return local(frame, event, arg)
        return None

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return _bounded_concat(template.generate(**variables))
    except _Deadline:
        raise TemplateTooCostly(f"rendering took more than {MAX_SECONDS} s") from None
    finally:
        sys.settrace(previous)
