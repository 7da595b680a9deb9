"""Tools attached to an environment: `ToolEnv(env, runner, tokenizer=...)` is an environment
whose model may call the runner's tools before it answers.

Rules (one episode):

- prompt: the inner environment's first observation with the tool descriptions added by
  `postax.rl.tools.with_tools`: in the chat template's own tools section where the template
  has one (then `ToolEnv.tools` holds the schemas, which `ChatRenderer` passes to the
  template), else as a system message in the parser's call format. A string prompt becomes
  one user message (tools need a chat); a prompt given as token ids is refused.
- a turn with at least one attempted tool call (well-formed or not, as the runner's parser
  reads it) is a tool turn: the calls run (`ToolRunner.run_turn`: errors, unknown tools, bad
  arguments, exceptions and timeouts become error messages the model reads, never a crash)
  and their tool messages are the observation; reward 0, not done. The inner environment
  does not see it.
- a turn without calls is the inner environment's: its `step` result is returned as is.
- every turn's info holds `"tools"`: the runner's per-turn counts (`METRIC_KEYS`: calls and
  one count per outcome; zeros on an answer turn). `tool_metrics` sums them over episodes.
- `final_reward` and `close` are the inner environment's.

The episode budgets (`max_turns`, `max_tokens`) bound the number of tool turns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from postax.rl.envs.protocol import EpisodeError, StepResult, as_step_result
from postax.rl.tools.render import template_renders_tools, with_tools
from postax.rl.tools.runner import METRIC_KEYS, ToolRunner
from postax.validation import is_int

TOOL_INFO = "tools"  # the turn-info key of the per-turn tool counts


class ToolEnv:
    """`env` with the tools of `runner` (see the module docstring).

    tokenizer: the policy's tokenizer (to place the tool descriptions). call_format: the
    format the runner's parser reads ("hermes" or "llama3_json"), written into the system
    message of templates without a tools section. in_template: whether the template renders
    tools itself (None: probe it; pass the answer when building many environments).
    """

    def __init__(
        self,
        env: Any,
        runner: ToolRunner,
        *,
        tokenizer: Any,
        call_format: str = "hermes",
        template_name: str | None = None,
        in_template: bool | None = None,
    ) -> None:
        self.env = env
        self.runner = runner
        self.tokenizer = tokenizer
        self.call_format = call_format
        self.template_name = template_name
        schemas = runner.schemas
        if in_template is None:
            in_template = template_renders_tools(tokenizer, schemas, template_name=template_name)
        self.tools = schemas if in_template else None

    def reset(self, example: Mapping[str, Any]) -> list[dict[str, Any]]:
        prompt = self.env.reset(example)
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif not (
            isinstance(prompt, Sequence) and prompt and all(isinstance(m, Mapping) for m in prompt)
        ):
            kind = "token ids" if prompt and all(is_int(i) for i in prompt) else repr(prompt)[:80]
            raise EpisodeError(
                f"{type(self.env).__name__}.reset() returned {kind}: tools need a prompt of chat "
                "messages (or a string, sent as a user message)"
            )
        messages, _ = with_tools(
            self.tokenizer,
            prompt,
            self.runner.schemas,
            call_format=self.call_format,
            template_name=self.template_name,
            in_template=self.tools is not None,
        )
        return messages

    def step(self, turn_text: str) -> StepResult:
        turn = self.runner.run_turn(str(turn_text))
        counts = turn.counts
        if turn.outcomes:
            return StepResult(turn.messages, 0.0, False, {TOOL_INFO: counts})
        result = as_step_result(self.env.step(turn_text), type(self.env).__name__)
        return StepResult(
            result.observation, result.reward, result.done, {**result.info, TOOL_INFO: counts}
        )

    def final_reward(self, cut: str | None) -> float:
        final_reward = getattr(self.env, "final_reward", None)
        return 0.0 if final_reward is None else final_reward(cut)

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()


def tool_metrics(episodes: Sequence[Any]) -> dict[str, float]:
    """Tool use over episodes whose turns carry tool counts (empty dict when none do):
    `tool_calls` and `tool_errors` per episode (an error: any outcome but "ok"),
    `tool_error_rate` (errors / calls; 0 without calls), `tool_turns` per episode and
    `tool_<outcome>` totals."""
    counted = [
        [turn.info[TOOL_INFO] for turn in episode.turns if TOOL_INFO in turn.info]
        for episode in episodes
    ]
    if not any(counted):
        return {}
    totals = {key: float(sum(c[key] for turns in counted for c in turns)) for key in METRIC_KEYS}
    errors = totals["calls"] - totals["ok"]
    out = {
        "tool_calls": totals["calls"] / len(episodes),
        "tool_errors": errors / len(episodes),
        "tool_error_rate": errors / totals["calls"] if totals["calls"] else 0.0,
        "tool_turns": float(np.mean([sum(c["calls"] > 0 for c in turns) for turns in counted])),
    }
    out.update({f"tool_{key}": totals[key] for key in METRIC_KEYS if key != "calls"})
    return out
