"""Knowledge-distillation losses: pure functions of student and teacher outputs.

Every function returns per-position values [batch, seq]; `distill_loss` sums
them over the trained positions (the loss mask) and divides by the number of
trained positions in the whole global batch, so that micro-batching changes
nothing (as in `postax.losses.sft`).

Logit distillation (`token_divergence`, `topk_token_divergence`), with p the
teacher's and q the student's next-token distribution, both softened by the
temperature T (softmax(logits / T)):

- "forward_kl": KL(p || q) = sum_v p (log p - log q), the divergence of
  Hinton et al. 2015, "Distilling the Knowledge in a Neural Network" (their
  soft-target cross-entropy minus the teacher's entropy, which has no
  gradient): mean-seeking.
- "reverse_kl": KL(q || p), mode-seeking (Gu et al. 2024, "MiniLLM:
  Knowledge Distillation of Large Language Models", argue for it with
  generative students); the per-token loss of on-policy distillation.
- "jsd": the generalised Jensen-Shannon divergence of Agarwal et al. 2024,
  "On-Policy Distillation of Language Models: Learning from Self-Generated
  Mistakes" (GKD): with M = beta p + (1 - beta) q,
  JSD(beta) = beta KL(p || M) + (1 - beta) KL(q || M), beta in (0, 1). It
  tends to beta KL(p || q) as beta -> 0 and to (1 - beta) KL(q || p) as
  beta -> 1: forward and reverse KL are its scaled limits (use those kinds
  for the end points; at beta = 0 or 1 the JSD itself is 0).

Temperature (Hinton et al. 2015): both distributions are softened by T and the
divergence is multiplied by T^2, because the gradient of a softened
divergence with respect to the logits scales as 1/T^2 for large T; with the
T^2 factor the soft term keeps its weight relative to the hard-label term
when T changes. The hard-label cross-entropy is always at T = 1.

Top-k teacher (`topk_token_divergence`, used for cached teacher logits and
for `top_k > 0` on the fly): the teacher keeps its k largest logits per
position and is renormalised over them (p~ = softmax(top-k logits / T), zero
elsewhere). The student is treated so that each divergence stays the exact
divergence between the truncated teacher and the student wherever that is
finite:

- forward KL: the student keeps its full-vocabulary distribution, read at the
  k ids: KL(p~ || q) exactly (p~ is zero elsewhere), so student mass outside
  the teacher's top k is penalised through the normalisation of q.
- JSD: also the full-vocabulary student. Outside the top k, M = (1 - beta) q,
  so those ids add (1 - beta) (1 - q(top k)) (-log(1 - beta)) in closed form;
  the result is the exact JSD(beta) between p~ and q.
- reverse KL: KL(q || p~) is infinite whenever the student puts mass outside
  the top k, so the student is renormalised over the same k ids
  (q~ = q / q(top k)) and the loss is KL(q~ || p~). Student mass outside the
  top k is then not seen by this term (only by a hard-label term, if any).

With k = the vocabulary size every variant equals the full-vocabulary one.

Attention transfer (`attention_divergence`), after MiniLM (Wang et al. 2020,
"MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of
Pre-Trained Transformers"): for each query position the KL divergence
KL(A_teacher || A_student) between the two attention distributions over the
keys, for chosen (student layer, teacher layer) pairs. MiniLM matches head by
head and needs equal head counts; here "per_head" does that, and "mean"
(the default) first averages each model's attention distributions over its
heads (query heads, after grouped-query expansion), which is still a
distribution over the keys, so any two head counts can be matched. Keys a
model cannot see have probability 0 and add nothing where the teacher's
probability is 0; the student's log-probabilities are floored at 1e-30.

Feature distillation (`feature_distance`), after FitNets (Romero et al. 2015,
"FitNets: Hints for Thin Deep Nets"): the mean squared error over the feature
axis between a student hidden state, mapped to the teacher's width by a
learned linear regressor (the caller applies it), and the teacher's hidden
state of a chosen layer. `pooling="mean"` first averages each document's
(segment's) trained positions, and every trained position of the document
then carries that document's pooled error, so documents weigh by their
trained-token count and the global token normaliser still applies.
Deviations from FitNets: the hint is trained jointly with the final loss (no
separate first stage), on a transformer's residual stream rather than a
convolutional feature map.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from postax.losses.numerics import masked_sum
from postax.validation import is_int, is_number, require

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ATTENTION_HEADS = ("mean", "per_head")
FEATURE_POOLING = ("none", "mean")
# log of a student attention probability is floored here (keys it cannot see)
PROBABILITY_FLOOR = 1e-30

_require = functools.partial(require, prefix="loss.")


def _layer_pairs(value: object, field: str) -> tuple[tuple[int, int], ...]:
    pairs = value
    if isinstance(pairs, list | tuple):
        pairs = tuple(tuple(p) if isinstance(p, list | tuple) else p for p in pairs)
    ok = isinstance(pairs, tuple) and all(
        isinstance(p, tuple) and len(p) == 2 and all(is_int(i) and i >= 0 for i in p) for p in pairs
    )
    _require(ok, field, value, "a list of [student_layer, teacher_layer] pairs of ints >= 0")
    return pairs


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillLossConfig:
    """The distillation objective (the `loss:` section of `postax distill`).

    loss = (1 - hard_label_weight) * T^2 * divergence
         + hard_label_weight * cross-entropy on the data's next tokens
         + attention_weight * attention divergence (mean over layer pairs)
         + feature_weight * feature MSE (mean over layer pairs),
    each summed over trained positions and divided by their global count.

    divergence: "forward_kl", "reverse_kl" or "jsd" (see the module docstring).
    beta: JSD's beta in (0, 1); small beta is close to forward KL, large to reverse.
    temperature: T > 0 for both distributions (and the T^2 factor).
    top_k: keep the teacher's k largest logits (renormalised); 0 = the full vocabulary.
    hard_label_weight: in [0, 1]; 1 trains on hard labels alone.
    attention_layers: [student_layer, teacher_layer] pairs whose attention maps are matched.
    attention_heads: "mean" (average over heads first; any head counts) or "per_head".
    feature_layers: [student_layer, teacher_layer] pairs of hidden states (index k: the
      residual stream after k layers, 0 = embeddings); a learned projection maps the
      student's width to the teacher's when they differ.
    feature_pooling: "none" (per position) or "mean" (per document, over trained positions).
    """

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int = 0
    hard_label_weight: float = 0.0
    attention_weight: float = 0.0
    attention_layers: tuple[tuple[int, int], ...] = ()
    attention_heads: str = "mean"
    feature_weight: float = 0.0
    feature_layers: tuple[tuple[int, int], ...] = ()
    feature_pooling: str = "none"

    def __post_init__(self) -> None:
        for field, allowed in (
            ("divergence", DIVERGENCES),
            ("attention_heads", ATTENTION_HEADS),
            ("feature_pooling", FEATURE_POOLING),
        ):
            value = getattr(self, field)
            _require(value in allowed, field, value, f"one of {allowed}")
        _require(
            is_number(self.beta) and 0 < self.beta < 1,
            "beta",
            self.beta,
            "a number in (0, 1) (forward_kl and reverse_kl are the limits)",
        )
        _require(
            is_number(self.temperature) and 0 < self.temperature < math.inf,
            "temperature",
            self.temperature,
            "a finite number > 0",
        )
        _require(is_int(self.top_k) and self.top_k >= 0, "top_k", self.top_k, "an int >= 0")
        _require(
            is_number(self.hard_label_weight) and 0 <= self.hard_label_weight <= 1,
            "hard_label_weight",
            self.hard_label_weight,
            "a number in [0, 1]",
        )
        for kind in ("attention", "feature"):
            weight = getattr(self, f"{kind}_weight")
            _require(
                is_number(weight) and 0 <= weight < math.inf,
                f"{kind}_weight",
                weight,
                "a finite number >= 0",
            )
            pairs = _layer_pairs(getattr(self, f"{kind}_layers"), f"{kind}_layers")
            object.__setattr__(self, f"{kind}_layers", pairs)
            _require(
                bool(pairs) == (weight > 0),
                f"{kind}_layers",
                pairs,
                f"layer pairs exactly when {kind}_weight > 0 ({kind}_weight={weight!r})",
            )


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
    """sum over the last axis of p (log p - log q), p = exp(logp) (finite log-probs)."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _log_mixture(logp: jax.Array, logq: jax.Array, beta: float) -> jax.Array:
    """log(beta p + (1 - beta) q), computed from log-probs."""
    return jnp.logaddexp(math.log(beta) + logp, math.log1p(-beta) + logq)


def _check_divergence(divergence: str, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} is invalid: one of {DIVERGENCES}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"beta={beta!r} is invalid: a number in (0, 1)")


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """T^2 * D(teacher, student) per position [...] over the full vocabulary (logits [..., V])."""
    _check_divergence(divergence, beta)
    logq = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=-1)
    if divergence == "forward_kl":
        value = _kl(logp, logq)
    elif divergence == "reverse_kl":
        value = _kl(logq, logp)
    else:
        log_m = _log_mixture(logp, logq, beta)
        value = beta * _kl(logp, log_m) + (1.0 - beta) * _kl(logq, log_m)
    return temperature**2 * value


def teacher_top_k(teacher_logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(the k largest logits, float32 [..., k], and their int32 ids [..., k])."""
    values, ids = jax.lax.top_k(teacher_logits.astype(jnp.float32), k)
    return values, ids.astype(jnp.int32)


def topk_token_divergence(
    student_logits: jax.Array,
    teacher_values: jax.Array,
    teacher_ids: jax.Array,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> jax.Array:
    """T^2 * D(truncated teacher, student) per position [...]; student logits [..., V],
    teacher top-k logits and ids [..., k]. See the module docstring for the student side."""
    _check_divergence(divergence, beta)
    logq_full = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    logq = jnp.take_along_axis(logq_full, teacher_ids, axis=-1)
    logp = jax.nn.log_softmax(teacher_values.astype(jnp.float32) / temperature, axis=-1)
    if divergence == "forward_kl":
        value = _kl(logp, logq)
    elif divergence == "reverse_kl":
        renormalised = logq - jax.nn.logsumexp(logq, axis=-1, keepdims=True)
        value = _kl(renormalised, logp)
    else:
        log_m = _log_mixture(logp, logq, beta)
        inside = beta * _kl(logp, log_m) + (1.0 - beta) * _kl(logq, log_m)
        outside_mass = jnp.maximum(-jnp.expm1(jax.nn.logsumexp(logq, axis=-1)), 0.0)
        value = inside + (1.0 - beta) * -math.log1p(-beta) * outside_mass
    return temperature**2 * value


def attention_divergence(
    student_probs: jax.Array, teacher_probs: jax.Array, *, heads: str = "mean"
) -> jax.Array:
    """KL(A_teacher || A_student) per query position [b, t] from attention probabilities
    [b, heads, t, keys] of each model (head counts may differ with heads="mean")."""
    s = student_probs.astype(jnp.float32)
    t = teacher_probs.astype(jnp.float32)
    if heads == "mean":
        s, t = s.mean(axis=1, keepdims=True), t.mean(axis=1, keepdims=True)
    elif heads == "per_head":
        if s.shape[1] != t.shape[1]:
            raise ValueError(
                f"attention_heads='per_head' needs equal head counts: the student has "
                f"{s.shape[1]}, the teacher {t.shape[1]}; use 'mean'"
            )
    else:
        raise ValueError(f"heads={heads!r} is invalid: one of {ATTENTION_HEADS}")
    log_t = jnp.log(jnp.maximum(t, PROBABILITY_FLOOR))
    log_s = jnp.log(jnp.maximum(s, PROBABILITY_FLOOR))
    per_head = jnp.sum(jnp.where(t > 0, t * (log_t - log_s), 0.0), axis=-1)
    return per_head.mean(axis=1)


def feature_distance(
    student_features: jax.Array,
    teacher_features: jax.Array,
    *,
    loss_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    pooling: str = "none",
) -> jax.Array:
    """Mean squared error over the feature axis per position [b, t] between features
    [b, t, d] of equal width (the student's already projected).

    pooling="mean": each document (a segment of a row) is averaged over its trained
    positions (`loss_mask`) first; each position then carries its document's error.
    """
    s = student_features.astype(jnp.float32)
    t = teacher_features.astype(jnp.float32)
    if pooling == "none":
        return jnp.mean(jnp.square(s - t), axis=-1)
    if pooling != "mean":
        raise ValueError(f"pooling={pooling!r} is invalid: one of {FEATURE_POOLING}")
    if loss_mask is None or segment_ids is None:
        raise ValueError("pooling='mean' needs loss_mask and segment_ids")
    b, length = segment_ids.shape
    ids = (segment_ids + (length + 1) * jnp.arange(b)[:, None]).reshape(-1)
    count = b * (length + 1)
    mask = loss_mask.astype(jnp.float32).reshape(-1, 1)

    def pooled(x):
        total = jax.ops.segment_sum(x.reshape(-1, x.shape[-1]) * mask, ids, count)
        tokens = jax.ops.segment_sum(mask, ids, count)
        return total / jnp.maximum(tokens, 1.0)

    per_document = jnp.mean(jnp.square(pooled(s) - pooled(t)), axis=-1)
    return per_document[ids].reshape(b, length)


def distill_loss(
    cfg: DistillLossConfig,
    *,
    loss_mask: jax.Array,
    normalizer: jax.Array,
    divergence: jax.Array | None = None,
    nll: jax.Array | None = None,
    attention: jax.Array | None = None,
    feature: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss share of this micro-batch, metrics) from per-position terms [b, t].

    Each given term is summed over the trained positions (`loss_mask`) and
    reported as `<term>_sum`; the loss is their weighted sum (weights from
    `cfg`, see `DistillLossConfig`) divided by `normalizer`, the global count of
    trained positions. A term may be given with weight 0 (a metric only); a
    weighted term must be given.
    """
    mask = loss_mask.astype(jnp.float32)
    weights = {
        "divergence": 1.0 - cfg.hard_label_weight,
        "nll": cfg.hard_label_weight,
        "attention": cfg.attention_weight,
        "feature": cfg.feature_weight,
    }
    values = {"divergence": divergence, "nll": nll, "attention": attention, "feature": feature}
    total = jnp.zeros((), jnp.float32)
    metrics = {"loss_tokens": jnp.sum(mask)}
    for name, weight in weights.items():
        if values[name] is None:
            if weight:
                raise ValueError(f"the {name} term has weight {weight} but was not given")
            continue
        term = masked_sum(values[name], mask)
        metrics[f"{name}_sum"] = term
        if weight:
            total = total + weight * term
    return total / normalizer, metrics
