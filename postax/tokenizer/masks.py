"""Assistant masks: which tokens of a rendered conversation the assistant produced.

The mask marks the tokens the model should learn to produce, and always includes the
end-of-turn marker written right after the assistant content (`<|eot_id|>`, `<|im_end|>`,
`<end_of_turn>`, `</s>`): the model has to learn to stop.

1. Templates with `{% generation %}...{% endgeneration %}` blocks: the characters each block
   renders are recorded and every token overlapping them is marked, exactly as transformers'
   `return_assistant_tokens_mask=True`. The template decides what is inside the tags.
2. Templates without tags (most real ones: Llama 3, Qwen, Gemma) use prefix rendering. For the
   assistant message at index k, let P = render(messages[:k], add_generation_prompt=True) and
   F = render(messages[:k+1]). The assistant span runs from len(P) to len(F.rstrip()): the
   content and whatever the template appends to close the turn, less trailing whitespace. The
   closing marker is the last non-space text of the turn in every common template, while the
   newline after it only separates turns and is never generated (sampling stops at the marker).
   P must be a prefix of F and F a prefix of the whole rendering; templates that rewrite
   earlier turns (for example, dropping the reasoning of past assistant turns) fail that check
   with a `ChatTemplateError` suggesting generation tags. Content whitespace that a template
   keeps at the very end of a turn with no marker after it is left unmasked. A template that
   ignores `add_generation_prompt` gets its assistant header masked too.

Callers that need ids only (prompts, reward-model inputs) use `Tokenizer.encode_chat`, which
renders once and makes no prefix check.

`expand_marker` replaces a marker in the rendered text by a longer text before encoding and
moves the spans with it: how Gemma 3's processor turns each `<start_of_image>` the template
writes into the image's full token sequence.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from postax.tokenizer.jinja_env import ChatTemplate, ChatTemplateError, Span, render_template

ASSISTANT_ROLE = "assistant"


@dataclass(frozen=True)
class ChatEncoding:
    """A rendered conversation.

    Attributes:
        text: The rendered template.
        ids: `text` encoded without adding special tokens (the template writes them).
        assistant_mask: 1 for tokens the assistant produced (content and end-of-turn marker),
            0 elsewhere; same length as `ids`.
    """

    text: str
    ids: list[int]
    assistant_mask: list[int]


def assistant_spans(
    chat_template: ChatTemplate, context: Mapping[str, Any]
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of the assistant's output in it:
    from generation tags when the template has them, else by prefix rendering."""
    if chat_template.has_generation_tags:
        return render_template(chat_template, context, "the conversation")
    return _prefix_spans(chat_template, context)


def spans_to_mask(offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """1 for each token whose character range overlaps a span (spans sorted, disjoint)."""
    mask = [0] * len(offsets)
    current = 0
    for index, (start, end) in enumerate(offsets):
        while current < len(spans) and start >= spans[current][1]:
            current += 1
        if current == len(spans):
            break
        if end > spans[current][0]:
            mask[index] = 1
    return mask


def expand_marker(
    text: str, spans: Sequence[Span], marker: str, replacement: str
) -> tuple[str, list[Span]]:
    """`text` with every `marker` replaced by `replacement`, and `spans` moved with the text.

    A position moves by the growth of every marker that ends at or before it, so a span that
    starts at a marker starts at its replacement and a span that ends right after a marker
    ends after its replacement."""
    if not marker:
        raise ValueError("marker_expansion: the marker must be a non-empty string")
    pieces = text.split(marker)
    if len(pieces) == 1:
        return text, list(spans)
    ends, position = [], 0
    for piece in pieces[:-1]:
        position += len(piece) + len(marker)
        ends.append(position)
    grow = len(replacement) - len(marker)

    def moved(at: int) -> int:
        return at + grow * bisect.bisect_right(ends, at)

    return replacement.join(pieces), [(moved(a), moved(b)) for a, b in spans]


def _prefix_spans(
    chat_template: ChatTemplate, context: Mapping[str, Any]
) -> tuple[str, list[Span]]:
    """Render the conversation in `context` and locate each assistant message by rendering
    prefixes of it (the rule is in the module docstring)."""
    messages = context["messages"]

    def render(count: int, prompt: bool, what: str) -> str:
        variables = {**context, "messages": messages[:count], "add_generation_prompt": prompt}
        return render_template(chat_template, variables, what)[0]

    text = render(len(messages), context["add_generation_prompt"], "the conversation")
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != ASSISTANT_ROLE:
            continue
        prompt_what = f"messages[:{k}] with the generation prompt"
        turn_what = f"messages[:{k + 1}]"
        prompt = render(k, True, prompt_what)
        turn = render(k + 1, False, turn_what)
        _require_prefix(chat_template.name, prompt, turn, prompt_what, turn_what)
        _require_prefix(chat_template.name, turn, text, turn_what, "the whole conversation")
        spans.append((len(prompt), max(len(prompt), len(turn.rstrip()))))
    return text, spans


def _require_prefix(
    name: str, shorter: str, longer: str, shorter_what: str, longer_what: str
) -> None:
    """Raise unless `shorter` is a prefix of `longer`, showing where they part."""
    if longer.startswith(shorter):
        return
    pairs = enumerate(zip(shorter, longer, strict=False))
    at = next((i for i, (a, b) in pairs if a != b), min(len(shorter), len(longer)))
    raise ChatTemplateError(
        f"chat template {name!r} is not prefix-stable: rendering {shorter_what} is not a prefix "
        f"of rendering {longer_what} (from character {at}: {shorter[at : at + 40]!r} vs "
        f"{longer[at : at + 40]!r}). The template rewrites earlier turns, so assistant tokens "
        "cannot be found by rendering growing prefixes of the conversation. Wrap the assistant "
        "output in {% generation %}...{% endgeneration %} in the template to mark it explicitly."
    )
