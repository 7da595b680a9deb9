"""LaTeX answers to sympy expressions, parsed without running untrusted code, and
compared with bounded work.

`to_expression(text)` turns a normalised answer ("2\\sqrt{2}", "\\frac{x+1}{2}",
"3\\pi/4", "e^{2}") into a sympy expression, or None when it cannot (any
parse failure is None, never an exception). `expressions_equal(a, b)` is True
when both are numbers within a relative tolerance or `simplify(a - b) == 0`.

Safety. `sympy.parsing.sympy_parser.parse_expr` is a token rewrite followed
by Python `eval` of the rewritten code; model outputs are untrusted, so the two
halves are run separately: `stringify_expr` applies the transformations
(`standard_transformations` without `lambda_notation`, plus
`implicit_multiplication`, so "2x" and "2\\sqrt{2}" read as products), the
result is checked with `ast` against a whitelist (numbers, `Integer`/`Float`/
`Symbol` constructors, + - * / ** and unary signs, calls of a few named
functions; no attributes, subscripts, keywords, comparisons or lambdas), and
only then `eval_expr` builds the expression with a namespace holding just
those names and no builtins. Unknown names become symbols ("apples" is a
symbol, "e" is Euler's number, "i" and "I" are plain symbols).

Bounded work. Integer powers evaluate eagerly in sympy, so "2^{10^{10}}"
would never finish. Before evaluation an upper bound on the number of decimal
digits of every numeric sub-expression is computed from the syntax tree
(symbols count as one digit, so it also bounds polynomial degrees);
exponents above 10^4 in magnitude, factorials of arguments above 10^3 and
any bound above `MAX_DIGITS` are rejected. Inputs longer than
`MAX_EXPRESSION_CHARS` are rejected. Expressions with free symbols are first
compared at a few random points (a cheap way to reject most unequal pairs)
and only then simplified. A wall-clock limit is the caller's
(`answers_equal(timeout=...)`).
"""

from __future__ import annotations

import ast
import functools
import math
import random
import re
from fractions import Fraction

MAX_EXPRESSION_CHARS = 256
MAX_DIGITS = 2000  # upper bound on the decimal digits of any numeric sub-expression
MAX_EXPONENT_DIGITS = 4  # |exponent| < 10^4
MAX_FACTORIAL_DIGITS = 3  # n! for n < 10^3
RANDOM_POINTS = 3
ABSOLUTE_FLOOR = 1e-12  # differences this small are evaluation noise

# LaTeX commands with a sympy spelling.
_SYMBOLS = {
    "pi": " pi ",
    "infty": " oo ",
    "cdot": "*",
    "times": "*",
    "div": "/",
    "ln": " log",
    "log": " log",
    "exp": " exp",
    "sin": " sin",
    "cos": " cos",
    "tan": " tan",
}
_FUNCTIONS = ("sqrt", "log", "exp", "sin", "cos", "tan", "factorial", "Abs")
_CONSTANTS = ("pi", "oo", "e")
_CONSTRUCTORS = ("Integer", "Float", "Symbol")
_ALLOWED_CHARS = re.compile(r"[A-Za-z0-9_\s+\-*/().!]*")


class _Unsupported(ValueError):
    """The text is not an expression this module reads."""


def _group(text: str, i: int) -> tuple[str, int]:
    """The argument of a LaTeX command at text[i:]: a braced group, a command or one char."""
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        raise _Unsupported("missing argument")
    if text[i] == "{":
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j], j + 1
        raise _Unsupported("unbalanced braces")
    if text[i] == "\\":
        match = re.match(r"\\[A-Za-z]+", text[i:])
        if match:
            return match.group(0), i + len(match.group(0))
    return text[i], i + 1


def latex_to_sympy_text(text: str) -> str:
    """sympy syntax for a LaTeX math answer: \\frac, \\sqrt (with an index), \\pi,
    \\cdot, \\times, ^ and subscripts; braces become parentheses. Raises on other commands."""
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            match = re.match(r"\\([A-Za-z]+)", text[i:])
            if not match:
                raise _Unsupported(f"unsupported escape {text[i : i + 2]!r}")
            name = match.group(1)
            i += len(match.group(0))
            if name == "frac":
                num, i = _group(text, i)
                den, i = _group(text, i)
                out.append(f"(({latex_to_sympy_text(num)})/({latex_to_sympy_text(den)}))")
            elif name == "sqrt":
                index = None
                if i < len(text) and text[i] == "[":
                    end = text.find("]", i)
                    if end < 0:
                        raise _Unsupported("unclosed root index")
                    index, i = text[i + 1 : end], end + 1
                radicand, i = _group(text, i)
                radicand = latex_to_sympy_text(radicand)
                if index is None:
                    out.append(f" sqrt({radicand})")
                else:
                    out.append(f"(({radicand})**(1/({latex_to_sympy_text(index)})))")
            elif name in _SYMBOLS:
                out.append(_SYMBOLS[name])
            else:
                raise _Unsupported(f"unsupported command \\{name}")
        elif c == "_":
            sub, i = _group(text, i + 1)
            if not re.fullmatch(r"[A-Za-z0-9]+", sub):
                raise _Unsupported(f"unsupported subscript {sub!r}")
            out.append("_" + sub)
        elif c == "{":
            out.append("(")
            i += 1
        elif c == "}":
            out.append(")")
            i += 1
        elif c == "^":
            out.append("**")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


@functools.cache
def _parser():
    """(transformations, namespace) for sympy's parser; imported on first use."""
    import sympy
    from sympy.parsing import sympy_parser

    transformations = (
        *(
            t
            for t in sympy_parser.standard_transformations
            if t is not sympy_parser.lambda_notation
        ),
        sympy_parser.implicit_multiplication,
    )
    namespace = {name: getattr(sympy, name) for name in (*_FUNCTIONS, *_CONSTRUCTORS, "pi", "oo")}
    namespace["e"] = sympy.E
    namespace["__builtins__"] = {}
    return transformations, namespace


def _digits(node: ast.AST) -> float:
    """Upper bound on log10(1 + |value|) of a checked syntax tree (a symbol counts as 10)."""
    if isinstance(node, ast.Expression):
        return _digits(node.body)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float | str):
            raise _Unsupported(f"unsupported constant {node.value!r}")
        return 1.0
    if isinstance(node, ast.Name):
        if node.id not in (*_CONSTANTS, *_FUNCTIONS):
            raise _Unsupported(f"unknown name {node.id!r}")
        return 1.0
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        return _digits(node.operand)
    if isinstance(node, ast.BinOp):
        left, right = _digits(node.left), _digits(node.right)
        if isinstance(node.op, ast.Add | ast.Sub):
            return max(left, right) + 1.0
        if isinstance(node.op, ast.Mult | ast.Div):
            return left + right
        if isinstance(node.op, ast.Pow):
            if right > MAX_EXPONENT_DIGITS:
                raise _Unsupported("exponent too large")
            return left * 10.0**right
        raise _Unsupported(f"unsupported operator {type(node.op).__name__}")
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.keywords:
            raise _Unsupported("unsupported call")
        name = node.func.id
        if name in _CONSTRUCTORS:
            if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant):
                raise _Unsupported(f"unsupported {name} call")
            value = node.args[0].value
            if name == "Symbol":
                if not isinstance(value, str) or "__" in value:
                    raise _Unsupported(f"unsupported symbol {value!r}")
                return 1.0
            number = abs(float(value))  # Integer(int) or Float('1.5e3')
            if not math.isfinite(number):
                raise _Unsupported("number too large")
            return math.log10(1.0 + number)
        if name not in _FUNCTIONS or not node.args:
            raise _Unsupported(f"unsupported function {name!r}")
        args = [_digits(a) for a in node.args]
        if name == "exp":
            if max(args) > MAX_EXPONENT_DIGITS:
                raise _Unsupported("exponent too large")
            return 10.0 ** max(args)
        if name == "factorial":
            if max(args) > MAX_FACTORIAL_DIGITS:
                raise _Unsupported("factorial too large")
            n = 10.0 ** max(args)
            return n * math.log10(n)
        return sum(args)
    raise _Unsupported(f"unsupported syntax {type(node).__name__}")


@functools.lru_cache(maxsize=4096)
def to_expression(text: str):
    """The sympy expression of a LaTeX or plain answer, or None when it cannot be read safely."""
    try:
        return _to_expression(text)
    except Exception:
        return None


def _to_expression(text: str):
    from sympy import Basic
    from sympy.parsing import sympy_parser

    if len(text) > MAX_EXPRESSION_CHARS:
        return None
    code = latex_to_sympy_text(text).strip()
    if not code or not _ALLOWED_CHARS.fullmatch(code) or "__" in code:
        return None
    if re.search(r"\.\s*[A-Za-z_]", code):  # attribute access
        return None
    transformations, namespace = _parser()
    local = {}
    code = sympy_parser.stringify_expr(code, local, namespace, transformations)
    tree = ast.parse(code, mode="eval")
    if _digits(tree) > MAX_DIGITS:
        return None
    expr = sympy_parser.eval_expr(code, local, dict(namespace))
    return expr if isinstance(expr, Basic) else None


def close(x, y, tolerance: float) -> bool:
    """|x - y| <= tolerance * max(|x|, |y|), or within ABSOLUTE_FLOOR (evaluation noise)."""
    difference = abs(x - y)
    return difference <= tolerance * max(abs(x), abs(y)) or difference <= ABSOLUTE_FLOOR


def _value(expr, subs=None) -> complex | None:
    """The finite complex value of a numeric expression (or None)."""
    try:
        value = complex(expr.evalf(30, subs=subs))
    except (TypeError, ValueError, OverflowError, ZeroDivisionError):
        return None
    if not (math.isfinite(value.real) and math.isfinite(value.imag)):
        return None
    return value


def expressions_equal(a, b, *, tolerance: float) -> bool:
    """Numeric equality within relative tolerance (`close`) for numbers; with free
    symbols, random-point screening, then `simplify(a - b) == 0`."""
    import sympy

    if a == b:
        return True
    symbols = a.free_symbols | b.free_symbols
    if not symbols:
        x, y = _value(a), _value(b)
        return x is not None and y is not None and close(x, y, tolerance)
    rng = random.Random(0)
    for _ in range(RANDOM_POINTS):
        point = {}
        for symbol in sorted(symbols, key=str):
            value = Fraction(rng.uniform(0.2, 3.0) * rng.choice((-1, 1))).limit_denominator(97)
            point[symbol] = sympy.Rational(value.numerator, value.denominator)
        x, y = _value(a, point), _value(b, point)
        if x is not None and y is not None and not close(x, y, max(tolerance, 1e-9)):
            return False
    return sympy.simplify(a - b) == 0
