"""Code-execution rewards: run a completion's code against the example's tests.

`code_tests_reward(...)` returns a reward function (`fn(prompts, completions,
**fields) -> list[float]`, see `runner`) that runs each completion, with
its row's tests, in the process sandbox (`postax.rl.sandbox`), a batch at a
time through a `SandboxPool`.

Test formats, by the fields a row carries:

- HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained
  on Code", the `human-eval` harness): `test` (code defining
  `check(candidate)`) and `entry_point` (the function's name). The program
  is prefix + code, then `test`, then `check(<entry_point>)`, all in one
  namespace (a test may call other functions of the prompt). The prefix is
  the row's `prefix_field` (default "prompt": HumanEval's signature and
  docstring) or, with `prompt_is_code`, the prompt text itself. When the
  code defines `def <entry_point>(` it is a whole function (chat models)
  and follows the prefix on a new line, replacing the prefix's docstring-only
  definition; otherwise it continues the prefix directly (the function
  body, as base models complete it, and as `canonical_solution` is
  written). Deviations from the harness: the namespace's `__name__` is
  "solution" (the harness leaves it unset), so `if __name__ == "__main__":`
  demos do not run either; the harness's in-process guards (disabled
  `os.system` and friends) are replaced by the sandbox.
- Assert lists (MBPP style): `tests`, a list of statements such as
  "assert f(1) == 2"; the code runs first (after the prefix, if any), then
  each statement on its own: an exception or exit in one fails that test
  only.

Score (`mode`): "pass" is 1.0 when every test passed, else 0.0;
"fraction" is the fraction of assert-list tests passed (a HumanEval
`check` is one test: 0.0 or 1.0). A test counts as passed only when the
program reports it after running it: each report line carries a fresh
random token, so a program that exits early with status 0
(`sys.exit(0)`, `os._exit(0)`) passes nothing. Tests passed before a hang
or crash still count in "fraction" mode. The program's own stdout is sent
to /dev/null so that it cannot push the reports past the output limit. Not
guarded: a program that reads its own source to find the token (the
sandbox is resource isolation, not a judge against deliberate attacks).

Code extraction (`extract_code`, `extract`): a fenced block is a line
starting with ``` (optionally indented, with a language tag) up to a line
holding only ``` (or the end of the text, for a cut-off generation); an
indented fence has its indentation removed from the block. Blocks tagged
python, py or python3 are preferred, then untagged ones; blocks in other
languages are ignored. "last" (default: models often draft before the
final answer) takes the last such block, "first" the first; with no
block, or with "whole", the completion as written is the code.

Counting: every program's sandbox status is tallied in `reward.counts`
(running totals: "ok", "error", "timeout", "memory", "killed", plus
"sandbox_error") and `reward.last_counts` (the latest batch). A failed test
is not an error status (the harness catches it and reports it); a timeout,
crash or memory error before the reports scores 0. A row the sandbox itself could not run gets None, which
`RewardRunner` scores `on_error` and counts as a failure; nothing raises
except a row missing its test fields (a data error, which the runner
turns into `on_error` for the batch).

Budget: a batch of N rows takes up to ceil(N / max_workers) * timeout_s
seconds; give the reward entry a `timeout` above that (or null).
"""

from __future__ import annotations

import collections
import math
import re
import secrets
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np

from postax.rl.sandbox import SandboxPool
from postax.validation import is_int, is_number, require

MODES = ("pass", "fraction")
EXTRACTS = ("last", "first", "whole")
PYTHON_TAGS = ("python", "py", "python3")
COUNT_KEYS = ("ok", "error", "timeout", "memory", "killed", "sandbox_error")

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```[ \t]*(?P<tag>[\w+.-]*)[^\n]*\n(?P<body>.*?)(?:^[ \t]*```[ \t]*$|\Z)",
    re.MULTILINE | re.DOTALL,
)

_HARNESS = """\
import os as _os, sys as _sys
_report = _os.fdopen(_os.dup(1), "w", buffering=1)
_sys.stdout = open(_os.devnull, "w")
_namespace = {{"__name__": "solution"}}
exec(compile({code!r}, "solution.py", "exec"), _namespace)
_tests = {tests!r}
for _i, _test in enumerate(_tests):
    try:
        exec(compile(_test, "test_%d.py" % _i, "exec"), _namespace)
    except BaseException:
        _report.write("{token} fail %d\\n" % _i)
    else:
        _report.write("{token} pass %d\\n" % _i)
_report.write("{token} done\\n")
"""


def extract_code(completion: str, extract: str = "last") -> str:
    """The code of a completion; see the module docstring for the rule."""
    require(extract in EXTRACTS, "extract", extract, f"one of {', '.join(EXTRACTS)}")
    if extract == "whole":
        return completion
    tagged, untagged = [], []
    for match in _FENCE.finditer(completion):
        tag = match["tag"].lower()
        if tag and tag not in PYTHON_TAGS:
            continue
        body, indent = match["body"], match["indent"]
        if indent:
            body = "".join(
                line[len(indent) :] if line.startswith(indent) else line
                for line in body.splitlines(keepends=True)
            )
        (tagged if tag else untagged).append(body)
    blocks = tagged or untagged
    if not blocks:
        return completion
    return blocks[-1] if extract == "last" else blocks[0]


def _program(code: str, prefix: str, row: dict, token: str) -> tuple[str, int]:
    """(harness source, number of tests) of one row."""
    if row.get("test") is not None:
        entry = row["entry_point"]
        if re.search(rf"^def\s+{re.escape(entry)}\s*\(", code, re.MULTILINE):
            source = prefix + "\n" + code
        else:
            source = prefix + code
        tests = [row["test"] + f"\n\ncheck({entry})\n"]
    else:
        source = prefix + ("\n" if prefix and not prefix.endswith("\n") else "") + code
        tests = list(row["tests"])
    harness = _HARNESS.format(code=source, tests=tests, token=token)
    return harness, len(tests)


def _score(stdout: str, token: str, num_tests: int, mode: str) -> float:
    passed, done = set(), False
    for line in stdout.splitlines():
        head, _, rest = line.partition(" ")
        if head != token:
            continue
        if rest == "done":
            done = True
        elif rest.startswith("pass "):
            passed.add(int(rest[5:]))
    if mode == "pass":
        return float(done and len(passed) == num_tests)
    return len(passed) / num_tests if num_tests else 0.0


class CodeTestsReward:
    """The reward function `code_tests_reward` returns; see the module docstring."""

    def __init__(
        self,
        *,
        mode: str,
        extract: str,
        timeout_s: float,
        memory_mb: int,
        max_workers: int | None,
        prefix_field: str | None,
        prompt_is_code: bool,
    ):
        self.mode, self.extract = mode, extract
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.prefix_field, self.prompt_is_code = prefix_field, prompt_is_code
        self.max_workers = max_workers
        self._pool: SandboxPool | None = None
        self.counts: collections.Counter = collections.Counter({k: 0 for k in COUNT_KEYS})
        self.last_counts: collections.Counter = collections.Counter()
        self.last_error: str | None = None

    def _rows(self, prompts: Sequence, n: int, fields: dict) -> list[dict]:
        if "tests" not in fields and not ("test" in fields and "entry_point" in fields):
            raise ValueError(
                "code_tests needs per-row fields test + entry_point (HumanEval) or tests "
                f"(a list of assert statements); got fields {sorted(fields)}"
            )
        rows = []
        for i in range(n):
            row = {k: fields[k][i] for k in ("test", "entry_point", "tests") if k in fields}
            tests = row.get("tests")
            if isinstance(tests, np.ndarray):  # list columns read from Parquet
                row["tests"] = tests = tests.tolist()
            if row.get("test") is None and not (
                isinstance(tests, list | tuple) and all(isinstance(t, str) for t in tests)
            ):
                raise ValueError(
                    f"row {i}: tests={row.get('tests')!r} is invalid: a list of test statements "
                    "(or set test and entry_point)"
                )
            if row.get("test") is not None and not isinstance(row.get("entry_point"), str):
                raise ValueError(f"row {i}: entry_point={row.get('entry_point')!r} is invalid")
            prefix = ""
            if self.prefix_field and fields.get(self.prefix_field) is not None:
                prefix = fields[self.prefix_field][i] or ""
            elif self.prompt_is_code:
                prefix = prompts[i]
            if not isinstance(prefix, str):
                raise ValueError(f"row {i}: the code prefix is {type(prefix).__name__}, not text")
            row["prefix"] = prefix
            rows.append(row)
        return rows

    def __call__(self, prompts, completions, **fields) -> list[float | None]:
        n = len(completions)
        rows = self._rows(prompts, n, fields)
        if self._pool is None:
            self._pool = SandboxPool(self.max_workers)
        token = secrets.token_hex(8)
        jobs: list[tuple[Future, int]] = []
        for completion, row in zip(completions, rows, strict=True):
            code = extract_code(completion if isinstance(completion, str) else "", self.extract)
            source, num_tests = _program(code, row["prefix"], row, token)
            future = self._pool.submit(source, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
            jobs.append((future, num_tests))
        scores: list[float | None] = []
        counts: collections.Counter = collections.Counter()
        for future, num_tests in jobs:
            try:
                result = future.result()
            except Exception as e:  # the sandbox's failure, never the program's
                counts["sandbox_error"] += 1
                self.last_error = f"{type(e).__name__}: {e}"
                scores.append(None)
                continue
            counts[result.status] += 1
            scores.append(_score(result.stdout, token, num_tests, self.mode))
        self.counts.update(counts)
        self.last_counts = counts
        return scores

    def close(self) -> None:
        """Stops the pool's threads (a later call starts a new pool)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def code_tests_reward(
    *,
    mode: str = "pass",
    extract: str = "last",
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
    prefix_field: str | None = "prompt",
    prompt_is_code: bool = False,
) -> CodeTestsReward:
    """Reward function: run each completion's code with its row's tests in the sandbox.

    mode: "pass" (1.0 / 0.0) or "fraction" (of assert-list tests passed).
    extract: "last" / "first" fenced Python block, or the "whole" completion.
    timeout_s, memory_mb: the sandbox's limits per program.
    max_workers: programs run at once (None: the number of CPUs).
    prefix_field: the row field holding code the completion continues
      (HumanEval's "prompt"); null for none.
    prompt_is_code: use the prompt text as that prefix when the row has no
      `prefix_field` (raw-text code prompts; the data's `prompt_field` is
      not passed to rewards as a field).
    """
    require(mode in MODES, "mode", mode, f"one of {', '.join(MODES)}")
    require(extract in EXTRACTS, "extract", extract, f"one of {', '.join(EXTRACTS)}")
    require(
        is_number(timeout_s) and math.isfinite(timeout_s) and timeout_s > 0,
        "timeout_s",
        timeout_s,
        "a number of seconds > 0",
    )
    require(is_int(memory_mb) and memory_mb >= 64, "memory_mb", memory_mb, "an integer >= 64")
    require(
        max_workers is None or (is_int(max_workers) and max_workers >= 1),
        "max_workers",
        max_workers,
        "null (the number of CPUs) or an integer >= 1",
    )
    require(
        prefix_field is None or (isinstance(prefix_field, str) and prefix_field),
        "prefix_field",
        prefix_field,
        "null or a field name",
    )
    require(isinstance(prompt_is_code, bool), "prompt_is_code", prompt_is_code, "true or false")
    return CodeTestsReward(
        mode=mode,
        extract=extract,
        timeout_s=float(timeout_s),
        memory_mb=int(memory_mb),
        max_workers=max_workers,
        prefix_field=prefix_field,
        prompt_is_code=prompt_is_code,
    )
