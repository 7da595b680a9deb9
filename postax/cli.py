"""The `postax` command: `postax <command> [arguments]`.

Each command lives in its own module and is imported only when it runs, so
`postax generate` never imports the trainer and vice versa.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "generate": ("postax.sampling.cli", "Generate text from a Hugging Face checkpoint directory."),
    "sft": ("postax.recipes.sft", "Supervised fine-tuning (full, LoRA, QLoRA) from a YAML config."),
    "preference": (
        "postax.recipes.preference",
        "Preference tuning: DPO (sigmoid, IPO, hinge, robust), ORPO, SimPO, KTO (`loss:`).",
    ),
    "reward-model": (
        "postax.recipes.reward_model",
        "Train a reward model (Bradley-Terry) on preference pairs.",
    ),
    "grpo": (
        "postax.recipes.grpo",
        "RL with group advantages: GRPO, Dr.GRPO, DAPO, GSPO, RLOO, REINFORCE++.",
    ),
    "ppo": ("postax.recipes.ppo", "PPO with a value head or a separate critic, GAE, KL penalty."),
    "distill": (
        "postax.recipes.distill",
        "Knowledge distillation (logits, attention, features, GKD).",
    ),
}


def usage() -> str:
    lines = ["usage: postax <command> [arguments]", "", "commands:"]
    lines += [f"  {name:<14}{help_text}" for name, (_, help_text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"postax: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
