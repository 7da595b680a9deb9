"""Generation: the rollout engine (sampling and beam search) and teacher-forced scoring."""

from postax.sampling.sampler import Completion, Sampler, SamplingConfig, SamplingError
from postax.sampling.scoring import completion_logprobs, token_logprobs
from postax.sampling.strategies import process_logits

__all__ = [
    "Completion",
    "Sampler",
    "SamplingConfig",
    "SamplingError",
    "completion_logprobs",
    "process_logits",
    "token_logprobs",
]
