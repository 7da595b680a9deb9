"""Prompts and observations as token ids, rendered by the model's own chat template.

A trajectory is built by appending ids, never by re-tokenising text the model
produced: prompt ids, then for each turn the sampled ids and the ids of the
observation that follows. This module renders those two kinds of ids.

Prompt: chat messages are `tokenizer.encode_chat(messages,
add_generation_prompt=True, tools=...)`, a string is `tokenizer.encode(text)`
(bos only where the post-processor adds one), token ids are kept.

Observation (the rule): the observation ids are the text the template writes
between the end of the assistant turn's content and the start of the next
generation, encoded on its own (`add_special_tokens=False`). That text is found
by rendering

    [user: <marker>, assistant: <turn marker>, *observation messages]

with `add_generation_prompt=True` and taking everything after the turn marker:
for ChatML `<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n`,
for Llama 3 `<|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n...<|eot_id|>
<|start_header_id|>assistant<|end_header_id|>\\n\\n`. It starts with the template's
end-of-turn marker. Then:

- the turn ended with a stop token (the sampler keeps it in the turn's ids)
  and the rendered ids start with that same token: that first id is dropped,
  since the model already produced the end-of-turn marker;
- the turn was cut by a token budget (no stop token), or it stopped with an
  id the template does not write there (say `<|endoftext|>` under ChatML):
  the rendered ids are kept whole, so the template's own end-of-turn marker
  closes the turn after what the model produced.

So for a prefix-stable template, and turns that end with the template's
end-of-turn token, prompt + turns + observations equal the ids of the whole
conversation rendered and encoded at once (tests/test_envs.py checks ChatML,
Llama 3, Gemma and a Qwen3-style template). Other turns keep what was
sampled, which a re-tokenisation of the text need not reproduce. The
rendered text is encoded on its own; in the common templates it starts with a
special token, so its ids are the ones it would get inside the whole text
(a template whose end of turn starts with plain text gets that text's ids
alone, never merged with the model's last tokens). The template must write
an assistant message's content verbatim (the marker found once), else an
EpisodeError. Only the marker conversation and the observation are
rendered: templates that rewrite earlier turns (Qwen3 drops past reasoning)
never change the ids of turns already in the trajectory.

Roles: environment feedback is a `user` message; tool results are `tool`
messages. A template that fails on the `tool` role (Gemma's strict
user/assistant alternation) gets those messages as `user` messages instead
(consecutive ones joined by newlines into one): the role the template
provides. The check is done once per renderer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from postax.rl.envs.protocol import TOOL_ROLE, USER_ROLE, EpisodeError, Message, Prompt
from postax.tokenizer import ChatTemplateError
from postax.validation import is_int

USER_MARKER = "PostaxUserMarker"
TURN_MARKER = "PostaxTurnMarker"


class ChatRenderer:
    """Prompt and observation ids for one tokenizer, tool list and template (see the module
    docstring for the observation rule)."""

    def __init__(
        self,
        tokenizer,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        template_name: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.tools = None if tools is None else [dict(t) for t in tools]
        self.template_name = template_name
        self._tool_role: str | None = None

    def prompt_ids(self, prompt: Prompt, where: str = "prompt") -> list[int]:
        """Ids of a first observation: chat messages, a string or token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise EpisodeError(f"{where} is an empty string")
            return list(self.tokenizer.encode(prompt))
        if isinstance(prompt, Sequence) and prompt and all(is_int(i) for i in prompt):
            return [int(i) for i in prompt]
        if isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt):
            return list(
                self.tokenizer.encode_chat(
                    [dict(m) for m in prompt],
                    add_generation_prompt=True,
                    tools=self.tools,
                    template_name=self.template_name,
                )
            )
        raise EpisodeError(
            f"{where} is {prompt!r:.80}: expected a non-empty string, token-id list or list of "
            "chat messages"
        )

    def observation_text(self, messages: Sequence[Message]) -> str:
        """The text the template writes from the end of an assistant turn's content to the next
        generation prompt, with `messages` in between (tool roles mapped as the template allows)."""
        messages = self._with_roles(messages)
        text = self.tokenizer.render_chat(
            [
                {"role": USER_ROLE, "content": USER_MARKER},
                {"role": "assistant", "content": TURN_MARKER},
                *messages,
            ],
            add_generation_prompt=True,
            tools=self.tools,
            template_name=self.template_name,
        )
        if text.count(TURN_MARKER) != 1:
            raise EpisodeError(
                f"the chat template of {self.tokenizer.source} did not write an assistant "
                "message's content once; observations cannot be rendered as a suffix"
            )
        return text.split(TURN_MARKER, 1)[1]

    def observation_ids(
        self, messages: Sequence[Message], turn_ids: Sequence[int], stop_ids: Sequence[int]
    ) -> list[int]:
        """Ids appended after a sampled turn `turn_ids` and before the next one (the rule in
        the module docstring: the rendered suffix, less its first id when the turn already
        ends with it as a stop token)."""
        ids = list(self.tokenizer.encode(self.observation_text(messages), add_special_tokens=False))
        last = int(turn_ids[-1]) if len(turn_ids) else None
        if last is not None and last in set(stop_ids) and ids[:1] == [last]:
            ids = ids[1:]
        return ids

    @property
    def tool_role(self) -> str:
        """`tool` if the template renders a tool message after an assistant turn, else `user`."""
        if self._tool_role is None:
            try:
                self.tokenizer.render_chat(
                    [
                        {"role": USER_ROLE, "content": USER_MARKER},
                        {"role": "assistant", "content": TURN_MARKER},
                        {"role": TOOL_ROLE, "content": USER_MARKER},
                    ],
                    add_generation_prompt=True,
                    tools=self.tools,
                    template_name=self.template_name,
                )
                self._tool_role = TOOL_ROLE
            except ChatTemplateError:
                self._tool_role = USER_ROLE
        return self._tool_role

    def _with_roles(self, messages: Sequence[Message]) -> list[Message]:
        """Messages with `tool` roles the template lacks turned into `user` ones, consecutive
        tool results then joined (by newlines) into one message, so that templates that want
        alternating roles accept them."""
        if self.tool_role == TOOL_ROLE or not any(m["role"] == TOOL_ROLE for m in messages):
            return [dict(m) for m in messages]
        out: list[Message] = []
        previous_tool = False
        for message in messages:
            is_tool = message["role"] == TOOL_ROLE
            if is_tool and previous_tool:
                out[-1]["content"] += "\n" + message["content"]
            else:
                out.append({**message, "role": USER_ROLE} if is_tool else dict(message))
            previous_tool = is_tool
        return out
