"""The jinja2 sandbox chat templates run in: ImmutableSandboxedEnvironment plus cheap resource guards.

A template inside a model file is untrusted code (llama-cpp-python had a remote-code-execution CVE
from an unsandboxed environment). On top of jinja's sandbox (no underscore attributes, no mutation,
no file or process access) this bounds `range` iterations, string growth from `*`, `+`, `~`,
padding/format widths and joins, the rendered size, and the render's time: every call (macros
included), operator, attribute lookup, loop step and output chunk checks a deadline, so a macro
that recurses exponentially stops at the budget. Failures are TemplateError (HTTP 400).
"""

from __future__ import annotations

import contextvars
import json
import re
import time
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import filters as jfilters
from jinja2.compiler import CodeGenerator
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment, SecurityError

MAX_OUTPUT_CHARS = 16 * 1024 * 1024  # any prompt longer than this exceeds every context window
MAX_WIDTH = 100_000  # widths a template may pass to padding / repeat / format operations
MAX_RANGE_STEPS = 250_000  # total range() iterations in one render (nested loops multiply)
_ITEM_COST = 16  # a list element counts as this many characters (lists are slower to copy)
RENDER_TIMEOUT_S = 2.0  # default time budget of one render (the API passes its configured one)


class TemplateError(ValueError):
    """The chat template raised (raise_exception), failed to render, or violated the sandbox."""


# ---------------------------------------------------------------------------------------------
# Resource guards
# ---------------------------------------------------------------------------------------------

_range_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_range_budget")
# time.monotonic() after which the current render fails; None outside a render
_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("chat_deadline", default=None)
# Set by capability probing (engine/text/chat.py): called with every value passed to `tojson`, so probe
# values can note that the template serialised them.
tojson_hook: contextvars.ContextVar[Any] = contextvars.ContextVar("chat_tojson_hook", default=None)
_PCT_WIDE = re.compile(r"%[#0 +\-]*(?:\*|\d{6,}|\d*\.(?:\*|\d{6,}))")  # '%999999999d', '%*d'
_BRACE_WIDE = re.compile(r"\{[^{}]*:[^{}]*(?:\d{6,}|\{)")  # '{:>999999999}', '{:{}}'
_STRFTIME_WIDE = re.compile(r"%[-_0^#]*\d{4,}")


class RenderTimeout(TemplateError):
    """The render ran past its time budget."""


def check_deadline() -> None:
    limit = _deadline.get()
    if limit is not None and time.monotonic() > limit:
        raise RenderTimeout("chat template rendering took longer than its time budget")


def render_budget(timeout_s: float) -> tuple[contextvars.Token, contextvars.Token]:
    """Starts a render's budgets (loop steps, time); undo with `end_render_budget`."""
    return _range_budget.set([MAX_RANGE_STEPS]), _deadline.set(time.monotonic() + timeout_s)


def end_render_budget(tokens: tuple[contextvars.Token, contextvars.Token]) -> None:
    _range_budget.reset(tokens[0])
    _deadline.reset(tokens[1])


def _too_big(n: int, what: str) -> None:
    if n > MAX_OUTPUT_CHARS:
        raise TemplateError(f"chat template produced a value too large ({what})")


def _check_width(w: Any, what: str) -> None:
    if isinstance(w, int) and w > MAX_WIDTH:
        raise TemplateError(f"chat template asked for a width of {w} in {what} (limit {MAX_WIDTH})")


class _GuardedRange:
    """range() for templates: jinja's MAX_RANGE cap per call, and every iteration is charged to
    the current render's budget, so nested loops cannot run for hours."""

    __slots__ = ("_r",)

    def __init__(self, *args: int) -> None:
        self._r = args[0] if len(args) == 1 and isinstance(args[0], range) else range(*args)
        if len(self._r) > MAX_RANGE:
            raise TemplateError(f"range too big: {len(self._r)} items (limit {MAX_RANGE})")

    def __iter__(self) -> Any:
        budget = _range_budget.get(None)
        for v in self._r:
            if budget is not None:
                budget[0] -= 1
                if budget[0] < 0:
                    raise TemplateError(f"chat template ran more than {MAX_RANGE_STEPS} loop iterations")
                if budget[0] & 1023 == 0:
                    check_deadline()
            yield v

    def __reversed__(self) -> Any:
        return iter(_GuardedRange(self._r[::-1]))

    def __len__(self) -> int:
        return len(self._r)

    def __getitem__(self, i: Any) -> Any:
        return _GuardedRange(self._r[i]) if isinstance(i, slice) else self._r[i]

    def __contains__(self, v: Any) -> bool:
        return v in self._r

    def __repr__(self) -> str:
        return repr(self._r)


def _guard_str_call(owner: str, name: str, args: tuple, kwargs: dict) -> None:
    if name in ("ljust", "rjust", "center", "zfill", "expandtabs"):
        for a in (*args, *kwargs.values()):
            _check_width(a, f"str.{name}")
    elif name in ("format", "format_map") and _BRACE_WIDE.search(owner):
        raise TemplateError("chat template used a str.format width that is too large or computed")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        grow = len(args[1]) - len(args[0])
        if grow > 0:
            hits = owner.count(args[0]) if args[0] else len(owner) + 1
            _too_big(len(owner) + hits * grow, "str.replace")
    elif name == "join" and args and isinstance(args[0], list):
        _too_big(sum(len(x) for x in args[0] if isinstance(x, str)) + len(owner) * len(args[0]), "str.join")


def _check_result(value: Any, what: str) -> Any:
    """After the fact: stops doubling chains (`s % (s, s)`, `'{}{}'.format(s, s)`) at 2x the cap."""
    if isinstance(value, str):
        _too_big(len(value), what)
    elif isinstance(value, list):
        _too_big(len(value) * _ITEM_COST, what)
    return value


class _GuardedCodeGenerator(CodeGenerator):
    # `a ~ b` compiles to a join that the sandbox does not see; route it through a size check.
    def visit_Concat(self, node: Any, frame: Any) -> None:
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _GenerationTag(Extension):
    """HF's `{% generation %}...{% endgeneration %}` (assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        check_deadline()
        seqs = (str, list, tuple)
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, seqs) and isinstance(n, int):
                    _too_big(len(seq) * n * (1 if isinstance(seq, str) else _ITEM_COST), "repetition")
        elif operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
            _too_big((len(left) + len(right)) * (1 if isinstance(left, str) else _ITEM_COST), "concatenation")
        elif operator == "**" and isinstance(left, int) and isinstance(right, int):
            if abs(left) > 1 and right > 0 and left.bit_length() * right > 1 << 16:
                raise TemplateError("chat template computed a power that is too large")
        elif operator == "%" and isinstance(left, str) and _PCT_WIDE.search(left):
            raise TemplateError("chat template used a %-format width that is too large or computed")
        return _check_result(super().call_binop(context, operator, left, right), f"operator {operator}")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        check_deadline()  # every macro call passes here: exponential recursion stops at the budget
        target = getattr(__obj, "__wrapped__", __obj)  # str.format arrives wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name == "join" and args:  # size the pieces before joining (a generator is read once)
                args = (list(args[0]), *args[1:])
            _guard_str_call(owner, name, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs), "call result")

    def getattr(self, obj: Any, attribute: str) -> Any:
        check_deadline()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        check_deadline()
        return super().getitem(obj, argument)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja would return a silent Undefined; a template probing internals gets a clear error
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    @staticmethod
    def guarded_concat(parts: tuple) -> str:
        strs = [str(p) for p in parts]
        _too_big(sum(map(len, strs)), "~ concatenation")
        return "".join(strs)


def _raise_exception(message: Any = "") -> None:
    raise TemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    if _STRFTIME_WIDE.search(str(fmt)):
        raise TemplateError("chat template used a strftime width that is too large")
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # HF/llama.cpp semantics: plain json.dumps (", " and ": " separators), no HTML escaping
    hook = tojson_hook.get()
    if hook is not None:
        hook(value)
    _check_width(indent if isinstance(indent, int) else len(str(indent or "")), "tojson indent")
    sep = tuple(separators) if separators is not None else None
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=sep,
                      sort_keys=sort_keys, default=lambda o: None if isinstance(o, jinja2.Undefined) else str(o))


def _center(value: Any, width: int = 80) -> str:
    _check_width(width, "center")
    return jfilters.do_center(value, width)


def _indent(s: Any, width: Any = 4, first: bool = False, blank: bool = False) -> str:
    _check_width(width, "indent")
    w = width if isinstance(width, int) else len(str(width))
    _too_big(len(str(s)) + (str(s).count("\n") + 1) * max(w, 0), "indent")
    return jfilters.do_indent(s, width, first, blank)


def _format(value: Any, *args: Any, **kwargs: Any) -> str:
    if _PCT_WIDE.search(str(value)):
        raise TemplateError("chat template used a %-format width that is too large or computed")
    return _check_result(jfilters.do_format(value, *args, **kwargs), "format")


def _bounded(f: Any, what: str) -> Any:
    """A filter whose second argument is a count that it loops or allocates over (batch, slice)."""
    def wrapper(value: Any, n: Any, *args: Any, **kwargs: Any) -> Any:
        _check_width(n, what)
        return f(value, n, *args, **kwargs)
    return wrapper


@jinja2.pass_eval_context
def _replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> str:
    _guard_str_call(str(s), "replace", (str(old), str(new)), {})
    return jfilters.do_replace(eval_ctx, s, old, new, count)


@jinja2.pass_eval_context
def _join(eval_ctx: Any, value: Any, d: str = "", attribute: Any = None) -> str:
    items = list(value)
    if attribute is None:
        _too_big(sum(len(str(x)) for x in items) + len(d) * len(items), "join")
    return jfilters.do_join(eval_ctx, items, d, attribute)


_ENV: _ChatEnvironment | None = None


def environment() -> _ChatEnvironment:
    """One shared environment (thread-safe for rendering); HF's settings: trim/lstrip blocks."""
    global _ENV
    if _ENV is None:
        env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined,
                               extensions=[loopcontrols, _GenerationTag], autoescape=False)
        # ChainableUndefined: `messages[0].role` on an empty list is undefined, not an error
        # (llama-server renders an empty conversation; HF's default Undefined would raise)
        env.globals.update(range=_GuardedRange, raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.globals.pop("lipsum", None)  # lipsum(n=10**9) would loop for ages; no template needs it
        env.filters.update(tojson=_tojson, center=_center, indent=_indent, format=_format, replace=_replace,
                           join=_join, batch=_bounded(jfilters.do_batch, "batch"),
                           slice=_bounded(jfilters.do_slice, "slice"))
        _ENV = env
    return _ENV


# ---------------------------------------------------------------------------------------------
# Capability probes: values that note whether the template used them
# ---------------------------------------------------------------------------------------------
