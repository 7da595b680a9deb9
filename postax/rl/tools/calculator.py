"""A safe calculator: arithmetic expressions evaluated by walking Python's `ast`, never `eval`.

Allowed: int and decimal literals, `+ - * / // % **`, unary `-`/`+`, parentheses, the
constants `pi` and `e`, and the functions in `FUNCTIONS` called with positional arguments.
Anything else (names, attribute access, subscripts, strings, keywords, comparisons,
lambdas, ...) is a `CalculatorError` that names what was refused.

Exact where possible: integers and decimal literals are exact rationals (`fractions.Fraction`),
so `6 / 3` is `2`, `0.1 + 0.2` is `0.3` and `(1 / 3) * 3` is `1`; a rational result that is
whole comes back as an int, another one as the nearest float. Irrational operations
(`sqrt` of a non-square, `log`, `exp`, trigonometry, fractional powers) give floats, and a
float operand makes the operation float. `sqrt` of a perfect square stays exact.

Bounds, so that a model cannot stall the trainer: the expression is at most
`MAX_EXPRESSION_CHARS` long; an exact number may not exceed `MAX_BITS` bits (about 1000
decimal digits) in numerator or denominator: powers are checked before they are computed
(`9**9**9` is refused at once), other results after; `factorial` takes n <= `MAX_FACTORIAL`;
float results must be finite.
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from typing import Any

from postax.rl.tools.runner import ToolError

MAX_EXPRESSION_CHARS = 1000
MAX_BITS = 3322  # 10**1000 has 3322 bits
MAX_FACTORIAL = 450  # 450! has 1001 digits, just past the bound; larger n is refused at once
CONSTANTS = {"pi": math.pi, "e": math.e}

Number = int | Fraction | float


class CalculatorError(ToolError):
    """An expression the calculator refuses or cannot evaluate; the message says why."""


def _exact(x: Number) -> bool:
    return not isinstance(x, float)


def _checked(x: Any) -> Number:
    """`x` if it is a real number within the bounds."""
    if isinstance(x, bool) or not isinstance(x, int | Fraction | float):
        raise CalculatorError(f"the result is not a real number ({type(x).__name__})")
    if isinstance(x, float):
        if not math.isfinite(x):
            raise CalculatorError("the result is not finite (overflow or an undefined value)")
        return x
    x = Fraction(x)
    if max(abs(x.numerator).bit_length(), x.denominator.bit_length()) > MAX_BITS:
        raise CalculatorError(f"the result is too large (more than {MAX_BITS} bits)")
    return x.numerator if x.denominator == 1 else x


def _power(base: Number, exponent: Number) -> Number:
    if _exact(base) and _exact(exponent) and Fraction(exponent).denominator == 1:
        n = int(exponent)
        size = max(abs(Fraction(base).numerator), Fraction(base).denominator)
        if size > 1 and abs(n) * math.log2(size) > MAX_BITS:
            raise CalculatorError(
                f"the power is too large (about {abs(n) * math.log2(size):.3g} bits, "
                f"limit {MAX_BITS})"
            )
        return Fraction(base) ** n
    result = float(base) ** float(exponent)
    if isinstance(result, complex):
        raise CalculatorError("a negative number to a fractional power is not a real number")
    return result


def _sqrt(x: Number) -> Number:
    if x < 0:
        raise CalculatorError("sqrt of a negative number")
    if _exact(x):
        q = Fraction(x)
        top, bottom = math.isqrt(q.numerator), math.isqrt(q.denominator)
        if top * top == q.numerator and bottom * bottom == q.denominator:
            return Fraction(top, bottom)
    return math.sqrt(x)


def _factorial(n: Number) -> int:
    if not _exact(n) or Fraction(n).denominator != 1 or n < 0:
        raise CalculatorError("factorial takes a whole number >= 0")
    if n > MAX_FACTORIAL:
        raise CalculatorError(f"factorial({n}) is too large (n <= {MAX_FACTORIAL})")
    return math.factorial(int(n))


def _round(x: Number, digits: Number | None = None) -> Number:
    if digits is None:
        return round(x)
    if not _exact(digits) or Fraction(digits).denominator != 1:
        raise CalculatorError("round's second argument must be a whole number")
    return round(x, int(digits))


def _float_fn(fn):
    def call(*args: Number) -> float:
        return fn(*(float(a) for a in args))

    return call


# name -> (function, smallest and largest number of arguments)
FUNCTIONS: dict[str, tuple[Any, int, int]] = {
    "abs": (abs, 1, 1),
    "round": (_round, 1, 2),
    "min": (min, 1, 32),
    "max": (max, 1, 32),
    "sqrt": (_sqrt, 1, 1),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "factorial": (_factorial, 1, 1),
    "exp": (_float_fn(math.exp), 1, 1),
    "log": (_float_fn(math.log), 1, 2),
    "log2": (_float_fn(math.log2), 1, 1),
    "log10": (_float_fn(math.log10), 1, 1),
    "sin": (_float_fn(math.sin), 1, 1),
    "cos": (_float_fn(math.cos), 1, 1),
    "tan": (_float_fn(math.tan), 1, 1),
}

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b if not (_exact(a) and _exact(b)) else Fraction(a) / Fraction(b),
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}
_REFUSED = {
    ast.Attribute: "attribute access",
    ast.Subscript: "subscripts",
    ast.Name: "names",
    ast.Compare: "comparisons",
    ast.BoolOp: "'and'/'or'",
    ast.Lambda: "lambdas",
    ast.IfExp: "conditional expressions",
    ast.JoinedStr: "strings",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Dict: "dicts",
    ast.Set: "sets",
    ast.NamedExpr: "assignments",
    ast.BinOp: "this operator",
}
ALLOWED = "numbers, + - * / // % **, parentheses, pi, e and " + ", ".join(FUNCTIONS)


def _refuse(node: ast.AST) -> CalculatorError:
    what = _REFUSED.get(type(node), type(node).__name__)
    return CalculatorError(f"{what} not allowed; the calculator takes {ALLOWED}")


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CalculatorError(f"the literal {value!r} is not a number")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise CalculatorError("a number literal is too large")
            return _checked(Fraction(repr(value)))  # decimal literals are exact
        return _checked(value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Name) and node.id in CONSTANTS:
        return CONSTANTS[node.id]
    if isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in FUNCTIONS:
            shown = repr(name) if name else "this kind of call"
            raise CalculatorError(f"unknown function {shown}; functions: {', '.join(FUNCTIONS)}")
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise CalculatorError(f"{name}() takes positional numbers only")
        fn, low, high = FUNCTIONS[name]
        if not low <= len(node.args) <= high:
            count = str(low) if low == high else f"{low} to {high}"
            raise CalculatorError(f"{name}() takes {count} arguments, got {len(node.args)}")
        return _checked(fn(*(_eval(a) for a in node.args)))
    if isinstance(node, ast.Name):
        raise CalculatorError(f"unknown name {node.id!r}; the calculator takes {ALLOWED}")
    raise _refuse(node)


def evaluate(expression: str) -> int | float:
    """The value of `expression`: an int when exact and whole, else a float (see the module
    docstring). Raises `CalculatorError` with the reason for anything refused or undefined."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be a string, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"the expression has {len(expression)} characters (limit {MAX_EXPRESSION_CHARS})"
        )
    if not expression.strip():
        raise CalculatorError("the expression is empty")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        detail = e.msg if isinstance(e, SyntaxError) else type(e).__name__
        raise CalculatorError(f"not an arithmetic expression ({detail})") from None
    try:
        value = _eval(tree.body)
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large for a float") from None
    except RecursionError:
        raise CalculatorError("the expression is nested too deeply") from None
    except (ValueError, ArithmeticError) as e:  # math domain errors
        raise CalculatorError(f"undefined: {e}") from None
    if isinstance(value, Fraction):
        return float(value)
    return value


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly where possible.

    Args:
        expression: The expression, e.g. "12345 * 678 + 9 / 3". Allowed: numbers,
            + - * / // % **, parentheses, pi, e, and the functions abs, round, min, max,
            sqrt, floor, ceil, factorial, exp, log, log2, log10, sin, cos, tan.
    """
    return str(evaluate(expression))
