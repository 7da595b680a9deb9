"""Math answer rewards: extract a final answer from a completion and compare it
with the reference.

Extraction (`extract_answer`), by mode:

- "boxed": the content of the last complete `\\boxed{...}` or `\\fbox{...}`
  (nested and escaped braces handled; `\\boxed 5` read up to the next space),
  the convention of the MATH data set (Hendrycks et al. 2021, "Measuring
  Mathematical Problem Solving With the MATH Dataset").
- "hash": the rest of the line after the last `####`, the GSM8K convention
  (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems").
- "last_number": the last number in the text: optional sign, thousands
  separators ("1,234", kept as written), decimals, fractions "a/b".
- "auto": boxed, else hash, else last number.

Equivalence (`answers_equal`), in order, on normalised strings:

1. Normalisation strips math delimiters ($, \\( \\), \\[ \\]), currency
   dollars, `\\left`/`\\right`, spacing commands, degree marks, a trailing
   period, a one-variable assignment prefix ("x = 5" -> "5"), `\\text{...}`
   wrappers, and units conservatively: a trailing `\\text{...}` after a
   number or expression, or trailing words of two or more letters after a
   plain number ("5 dollars", "12 cm^2"; never a single letter, so "5 x" is
   kept). "1,234" becomes 1234 only when every group after the first has
   three digits. `\\dfrac`/`\\tfrac` read as `\\frac`. An integer followed by a
   proper fraction is a mixed number: "2\\frac{1}{2}" and "2 1/2" are 5/2
   (but "2\\frac{3}{2}" is the product 3).
2. Equal strings (ignoring spaces) are equal.
3. Tuples and intervals ("(1, 2)", "[0, 1)"): equal when the brackets
   match and the elements are equal in order. Sets ("\\{1, 2\\}") and bare
   lists of solutions ("1, 2", "x = 1, x = 2"): equal elements in any order.
   "(1, 2)" never equals "1, 2" or "[1, 2]".
4. Plain numbers and fractions compare exactly as rationals, within the
   relative `tolerance`: |a - b| <= tolerance * max(|a|, |b|) (so "10^{-7}"
   and "0" differ, "0.3333333" and "1/3" agree at 1e-6).
5. Everything else is parsed with sympy (see `symbolic`): numbers within
   tolerance, or `simplify(a - b) == 0`.

Percent (a choice): when one side ends in "%" and the other does not, the
percent value may mean either its number or the number / 100, so "50%"
equals "50" and "0.5" (references write percentages either way); when both
or neither carry "%", the numbers compare as written ("50%" and "0.5%"
differ, and so do "50" and "0.5").

Budget: answers longer than `MAX_ANSWER_CHARS` are unequal; the sympy step
runs in a daemon thread and counts as unequal after `timeout` seconds (the
thread cannot be stopped and finishes in the background; the syntax bounds
in `symbolic` make that rare). Results of the sympy step are cached per pair
of strings (4096 entries): groups of samples often repeat an answer.
`answers_equal` never raises.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import time
from collections.abc import Callable
from fractions import Fraction

from postax.rl.rewards import symbolic
from postax.validation import is_number, require

MODES = ("auto", "boxed", "hash", "last_number")
MAX_ANSWER_CHARS = 512
DEFAULT_TIMEOUT = 2.0

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_UNSIGNED = r"(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(rf"(?<![\w.])[-+−]?{_UNSIGNED}(?:/{_UNSIGNED})?")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_PLAIN = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d{1,3})?"
_PLAIN_NUMBER = re.compile(rf"({_PLAIN})(?:\s*/\s*({_PLAIN}))?")
_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|mbox|operatorname|boxed)"
    r"\s*(?=\{)"
)
_TRAILING_TEXT = re.compile(
    r"\\(?:text|textrm|textnormal|mathrm|mbox)\s*\{\s*([A-Za-z .]*)\}(\^\{?\d\}?)?$"
)
_UNIT_WORDS = re.compile(
    r"((?:[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+)%?)"
    r"\s+([A-Za-z]{2,}(?:\^\{?\d\}?)?(?:/[A-Za-z]+)?(?:\s+[A-Za-z]{2,})*)"
)
_NOT_UNITS = {"pi", "sqrt", "oo", "infinity"}
_MIXED = re.compile(r"(-?)(\d+)(?:\s*\\frac\{(\d+)\}\{(\d+)\}| (\d+)/(\d+))")
_ASSIGNMENT = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?\s*=\s*")
_DROP = re.compile(
    r"\\(?:left|right|displaystyle|textstyle|[bB]igg?[lr]?|q?quad)(?![A-Za-z])|\\[,;:! ]"
)
_DEGREES = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°")


# --------------------------------------------------------------------------- extraction


def _braced(text: str, start: int) -> int | None:
    """Index just past the brace group opening at text[start] (escaped braces skipped)."""
    depth = 0
    i = start
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _last_boxed(text: str) -> str | None:
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            end = _braced(text, i)
            if end is None:
                continue
            content = text[i + 1 : end - 1].strip()
        else:
            content = re.match(r"[^\s$]*", text[i:]).group(0)
        if content:
            return content
    return None


def _after_hash(text: str) -> str | None:
    if "####" not in text:
        return None
    rest = text.rsplit("####", 1)[1].strip()
    line = rest.split("\n", 1)[0].strip()
    return line or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace("−", "-") if numbers else None


def extract_answer(text: str, *, mode: str = "auto") -> str | None:
    """The final answer written in `text` (None when there is none); see the module docstring."""
    require(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
    if not isinstance(text, str):
        return None
    if mode == "boxed":
        return _last_boxed(text)
    if mode == "hash":
        return _after_hash(text)
    if mode == "last_number":
        return _last_number(text)
    for extract in (_last_boxed, _after_hash, _last_number):
        answer = extract(text)
        if answer is not None:
            return answer
    return None


def reference_answer(reference: object) -> str | None:
    """The answer of a data set reference: the boxed or `####` answer when it has one
    (a GSM8K solution, a MATH solution), else the whole value as a string."""
    if reference is None:
        return None
    text = reference if isinstance(reference, str) else str(reference)
    if _BOX.search(text):
        return _last_boxed(text)
    if "####" in text:
        return _after_hash(text)
    return text.strip() or None


# --------------------------------------------------------------------------- equivalence


def _unwrap_text(s: str) -> str:
    """`\\text{abc}` -> `abc` (and the other text-like commands), innermost structure kept."""
    while True:
        match = _TEXT_COMMANDS.search(s)
        if match is None:
            return s
        end = _braced(s, match.end())
        if end is None:
            return s
        s = s[: match.start()] + s[match.end() + 1 : end - 1] + s[end:]


def _normalize(text: str) -> str | None:
    s = text.strip()
    if len(s) > MAX_ANSWER_CHARS:
        return None
    s = s.replace("−", "-").replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    s = _DEGREES.sub("", s)
    trailing = _TRAILING_TEXT.search(s)
    if trailing and re.search(r"\d", s[: trailing.start()]):
        s = s[: trailing.start()]
    s = _unwrap_text(s)
    s = _DROP.sub("", s)
    s = s.replace("\\%", "%").replace("{,}", ",").replace("\\{", "{").replace("\\}", "}")
    s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    mixed = _MIXED.fullmatch(s)
    if mixed:
        sign, whole = mixed.group(1), int(mixed.group(2))
        num, den = (int(g) for g in (mixed.group(3, 4) if mixed.group(3) else mixed.group(5, 6)))
        if 0 < num < den:  # a proper fraction: a mixed number, not a product
            s = f"{sign}{whole * den + num}/{den}"
    assignment = _ASSIGNMENT.match(s)
    if assignment and s.count("=") == 1:
        s = s[assignment.end() :].strip()
    units = _UNIT_WORDS.fullmatch(s)
    if units and not set(units.group(2).lower().split()) & _NOT_UNITS:
        s = units.group(1)
    if _THOUSANDS.fullmatch(s.rstrip("%")):
        s = s.replace(",", "")
    return s


def _split_sequence(s: str) -> tuple[str, list[str]] | None:
    """(brackets, elements) of a tuple, interval, set or bare list; None for a scalar."""
    brackets = ""
    body = s
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        inner = s[1:-1]
        depth = 0
        for c in inner:  # the outer brackets must enclose the whole string
            depth += c in "([{"
            depth -= c in ")]}"
            if depth < 0:
                break
        if depth == 0:
            brackets, body = s[0] + s[-1], inner
    parts, depth, start = [], 0, 0
    for i, c in enumerate(body):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            parts.append(body[start:i].strip())
            start = i + 1
    if not parts:
        return None
    parts.append(body[start:].strip())
    return brackets, parts


def _percent(s: str) -> tuple[str, bool]:
    return (s[:-1].strip(), True) if s.endswith("%") else (s, False)


def _percent_pairs(x, x_percent: bool, y, y_percent: bool) -> list[tuple]:
    """The value pairs to compare: one side in percent may also mean its value / 100."""
    if x_percent == y_percent:
        return [(x, y)]
    return [(x, y), (x / 100, y)] if x_percent else [(x, y), (x, y / 100)]


def _fraction(s: str) -> Fraction | None:
    match = _PLAIN_NUMBER.fullmatch(s)
    if match is None:
        return None
    value = Fraction(match.group(1))
    if match.group(2) is not None:
        denominator = Fraction(match.group(2))
        if denominator == 0:
            return None
        value /= denominator
    return value


def _bounded(fn: Callable[[], bool], timeout: float | None) -> bool:
    """fn() in a daemon thread, False after `timeout` seconds or on an exception."""
    if timeout is None:
        return fn()
    if timeout <= 0:
        return False
    box: list[bool] = []

    def target():
        try:
            box.append(bool(fn()))
        except Exception:
            box.append(False)

    thread = threading.Thread(target=target, name="answers_equal", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(box and box[0])


@functools.lru_cache(maxsize=4096)
def _symbolic_equal(a: str, a_percent: bool, b: str, b_percent: bool, tolerance: float) -> bool:
    x, y = symbolic.to_expression(a), symbolic.to_expression(b)
    if x is None or y is None:
        return False
    return any(
        symbolic.expressions_equal(u, v, tolerance=tolerance)
        for u, v in _percent_pairs(x, a_percent, y, b_percent)
    )


def _scalar_equal(a: str, b: str, tolerance: float, deadline: float | None) -> bool:
    if a.replace(" ", "") == b.replace(" ", ""):
        return True
    (a, a_percent), (b, b_percent) = _percent(a), _percent(b)
    if not a or not b:
        return False
    x, y = _fraction(a), _fraction(b)
    if x is not None and y is not None:
        tol = Fraction(tolerance)
        return any(
            abs(u - v) <= tol * max(abs(u), abs(v))
            for u, v in _percent_pairs(x, a_percent, y, b_percent)
        )
    symbolic.to_expression("0")  # imports sympy outside the time limit
    remaining = None if deadline is None else deadline - time.monotonic()
    return _bounded(lambda: _symbolic_equal(a, a_percent, b, b_percent, tolerance), remaining)


def answers_equal(
    predicted: str,
    reference: str,
    *,
    tolerance: float = 1e-6,
    timeout: float | None = DEFAULT_TIMEOUT,
) -> bool:
    """Whether two final answers are mathematically equal; see the module docstring.

    timeout: seconds for the sympy step of this call (None: unbounded). Never raises.
    """
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        a, b = _normalize(predicted), _normalize(reference)
        if not a or not b:
            return False
        if a.replace(" ", "") == b.replace(" ", ""):
            return True
        left, right = _split_sequence(a), _split_sequence(b)
        if left is None and right is None:
            return _scalar_equal(a, b, tolerance, deadline)
        if left is None or right is None or left[0] != right[0] or len(left[1]) != len(right[1]):
            return False
        xs, ys = [_normalize(x) for x in left[1]], [_normalize(y) for y in right[1]]
        if not all(xs) or not all(ys):
            return False
        if left[0] in ("", "{}"):  # a list of solutions or a set: any order
            return _match_unordered(xs, ys, lambda x, y: _scalar_equal(x, y, tolerance, deadline))
        return all(_scalar_equal(x, y, tolerance, deadline) for x, y in zip(xs, ys, strict=True))
    except Exception:
        return False


def _match_unordered(xs: list[str], ys: list[str], equal: Callable[[str, str], bool]) -> bool:
    """Whether each x equals a distinct y (greedy; equality is transitive)."""
    unused = list(ys)
    for x in xs:
        for i, y in enumerate(unused):
            if equal(x, y):
                del unused[i]
                break
        else:
            return False
    return True


# --------------------------------------------------------------------------- rewards


def _check_scores(correct: float, wrong: float) -> None:
    for field, value in (("correct", correct), ("wrong", wrong)):
        require(is_number(value) and math.isfinite(value), field, value, "a finite number")


def _references(fields: dict, answer_field: str, factory: str) -> list:
    if answer_field not in fields:
        raise ValueError(
            f"{factory} needs the row field {answer_field!r} (answer_field); "
            f"the rows have: {', '.join(sorted(fields)) or 'no fields'}"
        )
    return list(fields[answer_field])


def math_reward(
    *,
    answer_field: str = "answer",
    mode: str = "auto",
    correct: float = 1.0,
    wrong: float = 0.0,
    tolerance: float = 1e-6,
    timeout: float | None = DEFAULT_TIMEOUT,
):
    """Reward function: `correct` when the answer extracted from a completion (by
    `mode`) equals the row's reference (`answers_equal`), else `wrong`.

    The reference is the row's `answer_field`, read with `reference_answer`
    (a GSM8K "... #### 42" solution or a boxed MATH solution gives its answer).
    timeout: seconds of sympy work per row.
    """
    require(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
    require(
        isinstance(answer_field, str) and answer_field, "answer_field", answer_field, "a field name"
    )
    _check_scores(correct, wrong)
    require(is_number(tolerance) and tolerance >= 0, "tolerance", tolerance, "a number >= 0")
    require(
        timeout is None or (is_number(timeout) and timeout > 0), "timeout", timeout, "None or > 0"
    )

    def reward(prompts, completions, **fields) -> list[float]:
        references = _references(fields, answer_field, "math_reward")
        scores = []
        for completion, reference in zip(completions, references, strict=True):
            predicted = extract_answer(completion, mode=mode)
            gold = reference_answer(reference)
            ok = (
                predicted is not None
                and gold is not None
                and answers_equal(predicted, gold, tolerance=tolerance, timeout=timeout)
            )
            scores.append(float(correct if ok else wrong))
        return scores

    reward.__name__ = reward.__qualname__ = "math_reward"
    return reward


def _squash(text: str) -> str:
    return " ".join(text.split())


def exact_match_reward(
    *, answer_field: str = "answer", mode: str = "auto", correct: float = 1.0, wrong: float = 0.0
):
    """Reward function: `correct` when the extracted answer equals the row's reference
    (read with `reference_answer`) as strings after collapsing whitespace, else `wrong`.
    No numeric equivalence: "1/2" and "0.5" differ."""
    require(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
    require(
        isinstance(answer_field, str) and answer_field, "answer_field", answer_field, "a field name"
    )
    _check_scores(correct, wrong)

    def reward(prompts, completions, **fields) -> list[float]:
        references = _references(fields, answer_field, "exact_match_reward")
        scores = []
        for completion, reference in zip(completions, references, strict=True):
            predicted = extract_answer(completion, mode=mode)
            gold = reference_answer(reference)
            ok = predicted is not None and gold is not None and _squash(predicted) == _squash(gold)
            scores.append(float(correct if ok else wrong))
        return scores

    reward.__name__ = reward.__qualname__ = "exact_match_reward"
    return reward
