"""`postax generate`: sample from a Hugging Face checkpoint directory.

One prompt:

    postax generate --model DIR --prompt "Once upon a time" --max-new-tokens 64
    postax generate --model DIR --chat --prompt "What is 2 + 2?" --temperature 0

Batch mode, one JSON request per line in and one JSON result per line out:

    postax generate --model DIR --input requests.jsonl --output results.jsonl

A request is an object with "prompt" (a string or a list of token ids) or
"messages" (a chat), an optional "id" echoed back, and any SamplingConfig
field (max_new_tokens, temperature, top_k, top_p, min_p, num_samples,
stop_token_ids, stop, seed, num_beams, length_penalty) overriding the
command-line defaults. Every valid request is generated in one batched run
(per-request settings share compilations). A result line is
{"line": N, "id": ..., "completions": [...]} or, for a request that could not
be run, {"line": N, "id": ..., "error": "..."}; blank lines are skipped. The
exit status is 1 when any line failed, after all other lines completed.

Seeds: a request's own "seed" makes it reproducible on its own (its samples
use ids 0..n-1). Otherwise requests share --seed (a fresh one when absent)
and sample ids count up through the file, so repeated prompts still get
independent samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from postax.sampling.sampler import Completion, Sampler, SamplingConfig
from postax.validation import ConfigError

CONFIG_FIELDS = tuple(f for f in SamplingConfig.__dataclass_fields__)
REQUEST_FIELDS = ("prompt", "messages", "id", *CONFIG_FIELDS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="postax generate", description="Generate text from a checkpoint directory."
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json + safetensors)"
    )
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    source.add_argument("--input", type=Path, help="JSONL requests, one per line")
    p.add_argument("--output", type=Path, help="JSONL results (default: stdout)")
    p.add_argument("--chat", action="store_true", help="send --prompt as a user chat message")
    p.add_argument(
        "--system", help="with --chat: a system message before each prompt (as in training)"
    )
    p.add_argument("--json", action="store_true", help="print --prompt results as JSON lines")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--stop-token-id",
        type=int,
        action="append",
        help="stop token id (repeatable; default: the tokenizer's eos ids)",
    )
    p.add_argument("--no-stop-ids", action="store_true", help="ignore eos: stop only at length")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--max-batch-size", type=int, default=64)
    return p


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    stop_ids = () if args.no_stop_ids else args.stop_token_id
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        num_samples=args.num_samples,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
        stop_token_ids=None if stop_ids is None else tuple(stop_ids),
    )


def _completion_record(c: Completion) -> dict[str, Any]:
    record = c.to_json()
    del record["prompt_index"]
    return record


def _parse_request(
    text: str, defaults: dict[str, Any], sampler: Sampler
) -> tuple[Any, list[int], SamplingConfig, bool]:
    """(id, prompt ids, config, has own seed) of one JSONL line; raises ValueError naming the problem."""
    try:
        request = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from e
    if not isinstance(request, dict):
        raise ValueError(f"expected a JSON object, got {type(request).__name__}")
    request_id = request.get("id")
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise ValueError(f"unknown fields {unknown}; allowed: {', '.join(REQUEST_FIELDS)}")
    if ("prompt" in request) == ("messages" in request):
        raise ValueError("needs exactly one of 'prompt' (string or token ids) or 'messages'")
    overrides = {k: request[k] for k in CONFIG_FIELDS if k in request}
    for key in ("stop", "stop_token_ids"):
        if isinstance(overrides.get(key), list):
            overrides[key] = tuple(overrides[key])
    config = SamplingConfig(**{**defaults, **overrides})
    if "messages" in request:
        messages = request["messages"]
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list of {role, content} objects")
        prompt = messages
    else:
        prompt = request["prompt"]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("'prompt' is empty")
    ids = sampler.encode_prompt(prompt, where="'prompt'" if "prompt" in request else "'messages'")
    sampler.check_request(ids, config, "request")
    return request_id, ids, config, "seed" in request


def run_batch(sampler: Sampler, lines: list[str], defaults: dict[str, Any]) -> tuple[list, int]:
    """Results (one dict per non-blank line, in order) and the number of failed lines."""
    parsed: list[tuple[int, Any, Any]] = []  # (line number, id, (ids, config, own seed) | error)
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            request_id, ids, config, own_seed = _parse_request(text, defaults, sampler)
            parsed.append((number, request_id, (ids, config, own_seed)))
        except Exception as e:  # any failure is reported on its own line
            request_id = _safe_id(text)
            parsed.append((number, request_id, f"line {number}: {type(e).__name__}: {e}"))
    good = [p for p in parsed if not isinstance(p[2], str)]
    offsets, total = [], 0
    for _, _, (_, config, own_seed) in good:
        offsets.append(0 if own_seed else total)
        total += config.num_samples
    completions: dict[int, list[Completion]] = {}
    if good:
        requests = [(ids, config) for _, _, (ids, config, _) in good]
        for c in sampler.generate_many(requests, seed_offsets=offsets):
            completions.setdefault(c.prompt_index, []).append(c)
    results, failed, index = [], 0, 0
    for number, request_id, item in parsed:
        if isinstance(item, str):
            results.append({"line": number, "id": request_id, "error": item})
            failed += 1
        else:
            records = [_completion_record(c) for c in completions[index]]
            results.append({"line": number, "id": request_id, "completions": records})
            index += 1
    return results, failed


def _safe_id(text: str) -> Any:
    try:
        request = json.loads(text)
    except json.JSONDecodeError:
        return None
    return request.get("id") if isinstance(request, dict) else None


def load_checked_tokenizer(directory: str | Path):
    """`load_tokenizer(directory)`, its ValueErrors (a file that does not parse, a named token
    not in the vocabulary) raised as the user's `ConfigError` naming the directory."""
    from postax.tokenizer import ChatTemplateError, load_tokenizer

    try:
        return load_tokenizer(directory)
    except ChatTemplateError:
        raise
    except ValueError as error:
        raise ConfigError(f"tokenizer {directory}: {error}") from error


def main(argv: list[str] | None = None) -> int:
    """Runs the command; a user's mistake raises (`postax.cli.main` prints it on one line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.output is not None and not args.output.parent.is_dir():
        parser.error(f"--output: directory {args.output.parent} does not exist")
    # Every check on the arguments and the input file comes before the model is loaded.
    SamplingConfig(**_defaults(args))
    lines = None if args.input is None else args.input.read_text(encoding="utf-8").splitlines()
    # Imported here so that `postax generate --help` stays fast.
    from postax.models import load_model
    from postax.models.stack import stack_layers

    model = load_model(args.model, dtype=args.dtype)
    stack_layers(model)  # one scanned layer: compile time flat in depth
    tokenizer = load_checked_tokenizer(args.tokenizer or args.model)
    sampler = Sampler(model, tokenizer, max_batch_size=args.max_batch_size)
    defaults = _defaults(args)

    if lines is not None:
        results, failed = run_batch(sampler, lines, defaults)
        out = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
        if args.output is None:
            sys.stdout.write(out)
        else:
            args.output.write_text(out, encoding="utf-8")
        if failed:
            print(f"postax generate: {failed} of {len(results)} requests failed", file=sys.stderr)
        return 1 if failed else 0

    if args.system is not None and not args.chat:
        raise ConfigError("--system needs --chat (it is the conversation's system message)")
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    prompts = [[*system, {"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    completions = sampler.generate(prompts, SamplingConfig(**defaults))
    texts = []
    for c in completions:
        if args.json:
            texts.append(json.dumps(c.to_json(), ensure_ascii=False))
        elif len(completions) == 1:
            texts.append(c.text)
        else:
            texts.append(f"--- prompt {c.prompt_index} sample {c.sample_index} ---\n{c.text}")
    text = "\n".join(texts) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text, encoding="utf-8")
    return 0
