"""RL math: advantage estimators, the clipped policy loss and the value loss.

Golden values are worked out by hand in the comments; the losses are checked
against numpy reference implementations written here.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postax.losses.numerics import aggregation_normalizer, masked_whiten
from postax.losses.policy import PolicyLossConfig, policy_loss
from postax.losses.value import value_loss
from postax.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    broadcast_to_tokens,
    gae,
    group_advantages,
    reinforce_plus_plus_advantages,
    rloo_advantages,
    sequence_advantages,
    token_rewards_with_kl,
)
from postax.validation import ConfigError

NAN = np.nan


# ---------------------------------------------------------------- advantages


def test_grpo_group_advantages_by_hand():
    rewards = np.array([1, 0, 0, 1, 2, 2, 2, 2], np.float32)
    # group 1: mean 0.5, deviations +-0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    expected = 0.5 / math.sqrt(1 / 3)  # 0.8660254
    adv = np.asarray(group_advantages(rewards, 4, scale="std", epsilon=0.0))
    np.testing.assert_allclose(adv[:4], [expected, -expected, -expected, expected], rtol=1e-6)
    assert np.all(adv[4:] == 0.0)  # equal rewards: exactly 0
    adv_eps = np.asarray(group_advantages(rewards, 4))  # std + 1e-6
    np.testing.assert_allclose(adv_eps[0], 0.5 / (math.sqrt(1 / 3) + 1e-6), rtol=1e-6)


def test_group_of_equal_inexact_rewards_is_exactly_zero():
    rewards = np.full(6, 0.1, np.float32)
    for scale in ("std", "none"):
        assert np.all(np.asarray(group_advantages(rewards, 3, scale=scale)) == 0.0)
    assert np.all(np.asarray(rloo_advantages(rewards, 3)) == 0.0)


def test_dr_grpo_group_advantages_by_hand():
    rewards = np.array([1, 0, 0, 1, 3, 1, 2, 2], np.float32)
    # group means 0.5 and 2
    adv = group_advantages(rewards, 4, scale="none")
    np.testing.assert_allclose(adv, [0.5, -0.5, -0.5, 0.5, 1, -1, 0, 0], atol=1e-7)
    # a group of one has advantage 0 without std scaling
    assert np.all(np.asarray(group_advantages(rewards, 1, scale="none")) == 0.0)


def test_rloo_by_hand():
    rewards = np.array([1, 0, 0, 1, 3, 1, 2, 2], np.float32)
    # 1 - (0+0+1)/3 = 2/3; 0 - (1+0+1)/3 = -2/3
    # 3 - (1+2+2)/3 = 4/3; 1 - (3+2+2)/3 = -4/3; 2 - (3+1+2)/3 = 0
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 4 / 3, -4 / 3, 0, 0]
    np.testing.assert_allclose(rloo_advantages(rewards, 4), expected, atol=1e-6)
    # G = 2: each sample against the other one
    np.testing.assert_allclose(rloo_advantages(np.array([1.0, 3.0]), 2), [-2.0, 2.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: group_advantages(np.ones(4), 1, scale="std"), "group_size=1"),
        (lambda: rloo_advantages(np.ones(4), 1), "group_size=1"),
        (lambda: group_advantages(np.ones(6), 4), "a divisor of the number of rewards"),
        (lambda: group_advantages(np.ones(4), 2, scale="mad"), "scale='mad'"),
        (lambda: group_advantages(np.ones((2, 2)), 2), "rewards.shape"),
        (lambda: sequence_advantages("gae", np.ones(4), 2), "token-level"),
        (
            lambda: reinforce_plus_plus_advantages(np.ones((2, 2)), np.ones((2, 2)), group_size=2),
            "None unless sequence_rewards",
        ),
        (
            lambda: gae(np.ones((1, 2)), np.ones((1, 2)), np.ones((1, 2)), gamma=1.5, lam=1.0),
            "gamma=1.5",
        ),
    ],
)
def test_advantage_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_sequence_advantages_dispatch():
    rewards = np.array([1, 0, 0, 1, 3, 1, 2, 2], np.float32)
    assert set(ADVANTAGE_ESTIMATORS) >= {"grpo", "dr_grpo", "rloo"}
    np.testing.assert_array_equal(
        sequence_advantages("grpo", rewards, 4), group_advantages(rewards, 4, scale="std")
    )
    np.testing.assert_array_equal(
        sequence_advantages("dr_grpo", rewards, 4), group_advantages(rewards, 4, scale="none")
    )
    np.testing.assert_array_equal(
        sequence_advantages("rloo", rewards, 4), rloo_advantages(rewards, 4)
    )


def test_broadcast_to_tokens():
    mask = np.array([[0, 1, 1], [1, 0, 0]], bool)
    np.testing.assert_array_equal(
        broadcast_to_tokens(np.array([2.0, -1.0]), mask), [[0, 2, 2], [-1, 0, 0]]
    )


MASK3 = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0]], np.float32)


def test_token_rewards_with_kl_by_hand():
    kl = np.array([[NAN, 0.5, 1.0, 2.0, NAN], [NAN, NAN, 1.0, 0.0, 3.0], [NAN] * 5], np.float32)
    out = token_rewards_with_kl(np.array([1.0, 2.0, 3.0]), kl, MASK3, 0.1)
    expected = [
        [0, -0.05, -0.1, 1 - 0.2, 0],  # reward on the last completion token (column 3)
        [0, 0, -0.1, 0, 2 - 0.3],  # last token is the last column
        [0, 0, 0, 0, 0],  # empty row: nothing
    ]
    np.testing.assert_allclose(out, expected, atol=1e-7)


def test_reinforce_plus_plus_by_hand():
    mask = np.array([[0, 1, 1, 0], [0, 1, 1, 1]], np.float32)
    kl = np.array([[NAN, 0.5, 1.0, NAN], [NAN, 0.0, 1.0, 2.0]], np.float32)
    # token rewards (kl_coef 0.1): row 0 [., -0.05, 1 - 0.1, .]; row 1 [., 0, -0.1, -0.2]
    # returns-to-go: row 0 [0.85, 0.9]; row 1 [-0.3, -0.3, -0.2]
    returns = np.array([0.85, 0.9, -0.3, -0.3, -0.2])
    mean = 0.95 / 5
    std = math.sqrt(np.sum((returns - mean) ** 2) / 5)  # population std
    whitened = (returns - mean) / (std + 1e-6)

    @jax.jit
    def variants(rewards, mask, kl):
        penalty = -0.1 * kl  # NaN outside the mask: ignored
        return (
            reinforce_plus_plus_advantages(penalty, mask, sequence_rewards=rewards),
            reinforce_plus_plus_advantages(penalty, mask, sequence_rewards=rewards, group_size=2),
            reinforce_plus_plus_advantages(jnp.zeros(mask.shape), mask, sequence_rewards=rewards),
            reinforce_plus_plus_advantages(token_rewards_with_kl(rewards, kl, mask, 0.1), mask),
        )

    plain, baseline, no_kl, combined = variants(np.array([1.0, 0.0]), mask, kl)
    np.testing.assert_allclose(plain, [[0, *whitened[:2], 0], [0, *whitened[2:]]], atol=1e-5)
    # the same rewards passed whole, as token_rewards_with_kl builds them
    np.testing.assert_allclose(combined, plain, atol=1e-6)

    # baseline variant (G = 2): rewards [1, 0] -> [0.5, -0.5] before the KL term
    # token rewards: row 0 [., -0.05, 0.4, .]; row 1 [., 0, -0.1, -0.7]
    returns = np.array([0.35, 0.4, -0.8, -0.8, -0.7])
    mean = returns.mean()
    whitened = (returns - mean) / (returns.std() + 1e-6)
    np.testing.assert_allclose(baseline, [[0, *whitened[:2], 0], [0, *whitened[2:]]], atol=1e-5)

    # no KL: every token of a row gets the row's reward, then whitening over 5 tokens:
    # [1, 1, 0, 0, 0] -> mean 0.4, std sqrt(0.24)
    s = math.sqrt(0.24) + 1e-6
    np.testing.assert_allclose(
        no_kl, [[0, 0.6 / s, 0.6 / s, 0], [0, -0.4 / s, -0.4 / s, -0.4 / s]], atol=1e-5
    )


def test_masked_whiten_and_normalizer():
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], np.float32)
    values = np.array([[1.0, 3.0, NAN], [5.0, NAN, NAN], [NAN] * 3], np.float32)
    # mean 3, population std sqrt(8/3)
    s = math.sqrt(8 / 3) + 1e-6
    np.testing.assert_allclose(
        masked_whiten(values, mask), [[-2 / s, 0, 0], [2 / s, 0, 0], [0, 0, 0]], atol=1e-6
    )
    assert float(aggregation_normalizer(mask, "token_mean")) == 3.0
    assert float(aggregation_normalizer(mask, "sequence_mean")) == 2.0
    assert float(aggregation_normalizer(mask, "sequence_sum_constant", constant=8)) == 16.0
    with pytest.raises(ValueError, match="constant=None"):
        aggregation_normalizer(mask, "sequence_sum_constant")


def test_gae_by_hand_with_prompt_and_padding():
    rewards = np.array([[9, 0, 0, 1, 5], [9, 9, 0.5, 0, -1]], np.float32)
    values = np.array([[NAN, 0.5, 0.4, 0.6, 100], [7, NAN, 0.2, 0.1, 0.3]], np.float32)
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
    # gamma 0.9, lambda 0.8, gamma * lambda = 0.72
    # row 0: t3 delta = 1 + 0 - 0.6 = 0.4; A3 = 0.4
    #        t2 delta = 0 + 0.9*0.6 - 0.4 = 0.14; A2 = 0.14 + 0.72*0.4 = 0.428
    #        t1 delta = 0 + 0.9*0.4 - 0.5 = -0.14; A1 = -0.14 + 0.72*0.428 = 0.16816
    # row 1: t4 delta = -1 - 0.3 = -1.3; A4 = -1.3
    #        t3 delta = 0.9*0.3 - 0.1 = 0.17; A3 = 0.17 - 0.72*1.3 = -0.766
    #        t2 delta = 0.5 + 0.9*0.1 - 0.2 = 0.39; A2 = 0.39 - 0.72*0.766 = -0.16152
    advantages, returns = jax.jit(functools.partial(gae, gamma=0.9, lam=0.8))(rewards, values, mask)
    np.testing.assert_allclose(
        advantages, [[0, 0.16816, 0.428, 0.4, 0], [0, 0, -0.16152, -0.766, -1.3]], atol=1e-6
    )
    np.testing.assert_allclose(
        returns, [[0, 0.66816, 0.828, 1.0, 0], [0, 0, 0.03848, -0.666, -1.0]], atol=1e-6
    )


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=(4, 6)).astype(np.float32)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    mask = np.array(
        [[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0]], np.float32
    )
    # row 3 has a gap (e.g. a tool output): it is skipped, not an end of episode
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = np.flip(np.cumsum(np.flip(rewards * mask, 1), 1), 1)
    np.testing.assert_allclose(advantages, (to_go - values) * mask, atol=1e-5)
    np.testing.assert_allclose(returns, to_go * mask, atol=1e-5)


# ---------------------------------------------------------------- policy loss


def _np_kl(logp, ref, estimator):
    log_ratio = ref - logp
    return {
        "k1": -log_ratio,
        "k2": 0.5 * log_ratio**2,
        "k3": np.exp(log_ratio) - 1 - log_ratio,
    }[estimator]


def _np_aggregate(per_token, mask, mode, normalizer):
    if mode == "sequence_mean":
        rows = np.sum(per_token * mask, 1) / np.maximum(mask.sum(1), 1)
        return rows.sum() / normalizer
    return np.sum(per_token * mask) / normalizer


def _np_policy(d, cfg, normalizer, *, ref=None, entropy=None, behaviour=None):
    """(loss, clipped token count) of the clipped policy loss, in float64."""
    logp, old, adv, mask = (d[k].astype(np.float64) for k in ("logp", "old", "adv", "mask"))
    log_ratio = logp - old
    if cfg.ratio == "token":
        rho = np.exp(log_ratio)
    else:
        s = np.exp(np.sum(log_ratio * mask, 1) / np.maximum(mask.sum(1), 1))
        rho = np.broadcast_to(s[:, None], logp.shape)
    unclipped = rho * adv
    clipped = np.clip(rho, 1 - cfg.clip_low, 1 + cfg.clip_high) * adv
    per_token = -np.minimum(unclipped, clipped)
    if cfg.importance_cap is not None:
        per_token = per_token * np.minimum(np.exp(old - behaviour), cfg.importance_cap)
    loss = _np_aggregate(per_token, mask, cfg.aggregation, normalizer)
    if cfg.kl_coef:
        loss += cfg.kl_coef * _np_aggregate(
            _np_kl(logp, ref, cfg.kl_estimator), mask, cfg.aggregation, normalizer
        )
    if cfg.entropy_coef:
        loss -= cfg.entropy_coef * _np_aggregate(entropy, mask, cfg.aggregation, normalizer)
    return loss, np.sum((clipped < unclipped) * mask)


def _batch(seed=0, rows=4, length=6):
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, length), np.float32)
    for i, (start, stop) in enumerate([(1, 5), (2, 6), (0, 3), (0, 0)][:rows]):
        mask[i, start:stop] = 1  # prompt columns, completions, padding; row 3 is empty
    old = rng.normal(-1.5, 0.5, size=(rows, length)).astype(np.float32)
    logp = (old + rng.normal(0, 0.3, size=old.shape)).astype(np.float32)
    return {
        "logp": logp,
        "old": old,
        "adv": rng.normal(size=old.shape).astype(np.float32),
        "mask": mask,
        "ref": (old + rng.normal(0, 0.4, size=old.shape)).astype(np.float32),
        "entropy": rng.uniform(0.5, 2.0, size=old.shape).astype(np.float32),
        "behaviour": (old + rng.normal(0, 0.5, size=old.shape)).astype(np.float32),
    }


def _normalizer(mask, mode):
    return aggregation_normalizer(mask, mode, constant=6)


@pytest.mark.parametrize("ratio", ["token", "sequence", "sequence_token"])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean", "sequence_sum_constant"])
def test_policy_loss_matches_numpy(ratio, aggregation):
    d = _batch()
    if ratio != "token":  # sequence ratios: one advantage per row, as in GSPO
        # s = [0.859, 1.074, 1.00005, 1]: row 0 is clipped (s < 0.98 with A < 0)
        d["adv"] = np.broadcast_to(np.array([[-1.0], [1.0], [0.7], [2.0]]), d["adv"].shape)
    # asymmetric range, narrow enough that some tokens/sequences are clipped and some not
    cfg = PolicyLossConfig(ratio=ratio, aggregation=aggregation, clip_low=0.02, clip_high=0.1)
    norm = float(_normalizer(d["mask"], aggregation))
    loss, metrics = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], norm, cfg)
    expected, clipped = _np_policy(d, cfg, norm)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert 0 < clipped < d["mask"].sum()
    assert float(metrics["clipped_tokens"]) == clipped
    assert float(metrics["completion_tokens"]) == d["mask"].sum() == 11
    np.testing.assert_allclose(metrics["policy_loss"], expected, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["log_ratio_abs_sum"], np.sum(np.abs(d["logp"] - d["old"]) * d["mask"]), rtol=1e-5
    )
    r = np.exp(d["logp"] - d["old"])
    np.testing.assert_allclose(
        metrics["approx_kl_sum"], np.sum((r - 1 - np.log(r)) * d["mask"]), rtol=1e-4
    )
    assert "kl_sum" not in metrics and "entropy_sum" not in metrics


def test_policy_loss_ratio_sum():
    d = _batch()
    cfg = PolicyLossConfig(ratio="sequence")
    _, metrics = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], 1.0, cfg)
    lr = (d["logp"] - d["old"]) * d["mask"]
    s = np.exp(lr.sum(1) / np.maximum(d["mask"].sum(1), 1))
    np.testing.assert_allclose(metrics["ratio_sum"], np.sum(s * d["mask"].sum(1)), rtol=1e-5)
    _, metrics = policy_loss(d["logp"], d["old"], d["adv"], d["mask"], 1.0, PolicyLossConfig())
    np.testing.assert_allclose(metrics["ratio_sum"], np.sum(np.exp(lr) * d["mask"]), rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_policy_loss_kl_and_entropy_terms(estimator):
    d = _batch(seed=1)
    cfg = PolicyLossConfig(kl_coef=0.05, kl_estimator=estimator, entropy_coef=0.01)
    norm = float(_normalizer(d["mask"], cfg.aggregation))
    (loss, metrics), grad = jax.jit(
        jax.value_and_grad(
            lambda lp: policy_loss(
                lp,
                d["old"],
                d["adv"],
                d["mask"],
                norm,
                cfg,
                ref_logp=d["ref"],
                entropy=d["entropy"],
            ),
            has_aux=True,
        )
    )(d["logp"])
    expected, _ = _np_policy(d, cfg, norm, ref=d["ref"], entropy=d["entropy"])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    kl = _np_kl(d["logp"].astype(np.float64), d["ref"], estimator)
    np.testing.assert_allclose(metrics["kl_sum"], np.sum(kl * d["mask"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["kl_loss"], 0.05 * np.sum(kl * d["mask"]) / norm, rtol=1e-5)
    np.testing.assert_allclose(metrics["entropy_sum"], np.sum(d["entropy"] * d["mask"]), rtol=1e-6)
    np.testing.assert_allclose(
        metrics["entropy_loss"], -0.01 * np.sum(d["entropy"] * d["mask"]) / norm, rtol=1e-6
    )
    np.testing.assert_allclose(
        metrics["policy_loss"] + metrics["kl_loss"] + metrics["entropy_loss"], loss, rtol=1e-6
    )

    # gradient w.r.t. logp (token ratio, token_mean): per token
    # -rho A (0 where the clip binds) + beta dk/dlogp, all over the normaliser
    rho = np.exp(d["logp"].astype(np.float64) - d["old"])
    a = d["adv"]
    active = np.clip(rho, 0.8, 1.2) * a < rho * a
    diff = d["logp"].astype(np.float64) - d["ref"]
    dkl = {"k1": np.ones_like(diff), "k2": diff, "k3": 1 - np.exp(-diff)}[estimator]
    expected_grad = (np.where(active, 0.0, -rho * a) + 0.05 * dkl) * d["mask"] / norm
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_policy_loss_importance_weights():
    d = _batch(seed=2)
    cfg = PolicyLossConfig(importance_cap=1.5, clip_high=0.28)
    norm = float(_normalizer(d["mask"], cfg.aggregation))
    loss, metrics = policy_loss(
        d["logp"], d["old"], d["adv"], d["mask"], norm, cfg, behaviour_logp=d["behaviour"]
    )
    expected, _ = _np_policy(d, cfg, norm, behaviour=d["behaviour"])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    w = np.minimum(np.exp(d["old"].astype(np.float64) - d["behaviour"]), 1.5)
    assert np.any((w == 1.5) & (d["mask"] > 0)) and np.any((w < 1) & (d["mask"] > 0))
    np.testing.assert_allclose(metrics["importance_weight_sum"], np.sum(w * d["mask"]), rtol=1e-5)
    # the weight scales the gradient of the surrogate and gets none itself
    grads = jax.jit(
        jax.grad(
            lambda lp, b: policy_loss(
                lp, d["old"], d["adv"], d["mask"], norm, cfg, behaviour_logp=b
            )[0],
            argnums=(0, 1),
        )
    )(d["logp"], d["behaviour"])
    rho = np.exp(d["logp"].astype(np.float64) - d["old"])
    active = np.clip(rho, 0.8, 1.28) * d["adv"] < rho * d["adv"]
    assert np.any(active & (d["mask"] > 0))
    plain = np.where(active, 0.0, -rho * d["adv"]) * d["mask"] / norm
    np.testing.assert_allclose(grads[0], plain * w, rtol=1e-5, atol=1e-8)
    assert np.all(np.asarray(grads[1]) == 0.0)


def test_policy_gradient_sign_and_finite_difference():
    # one row, three tokens, all inside the clip range
    logp = np.array([[-1.0, -2.0, -0.5]], np.float32)
    old = np.array([[-1.05, -1.95, -0.5]], np.float32)
    adv = np.array([[1.0, -2.0, 0.5]], np.float32)
    mask = np.ones((1, 3), np.float32)
    cfg = PolicyLossConfig()

    f = jax.jit(lambda lp: policy_loss(lp, old, adv, mask, 3.0, cfg)[0])
    grad = np.asarray(jax.jit(jax.grad(f))(logp))
    # descent raises log-probs of positive-advantage tokens and lowers negative ones
    assert grad[0, 0] < 0 and grad[0, 1] > 0 and grad[0, 2] < 0
    for j in range(3):
        step = np.zeros_like(logp)
        step[0, j] = 1e-2
        numeric = (float(f(logp + step)) - float(f(logp - step))) / 2e-2
        np.testing.assert_allclose(grad[0, j], numeric, rtol=2e-3)
        # analytic: -exp(logp - old) A / 3
        np.testing.assert_allclose(grad[0, j], -np.exp(logp - old)[0, j] * adv[0, j] / 3, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_sequence_ratio_gradients(aggregation):
    d = _batch(seed=3)
    adv_rows = np.array([1.0, -1.0, 0.5, 2.0])
    adv = np.broadcast_to(adv_rows[:, None], d["adv"].shape).astype(np.float32)
    m = d["mask"].astype(np.float64)
    n = np.maximum(m.sum(1), 1)
    norm = float(_normalizer(d["mask"], aggregation))

    @jax.jit
    def grads(logp):
        out = {}
        for ratio in ("sequence", "sequence_token"):
            cfg = PolicyLossConfig(
                ratio=ratio, aggregation=aggregation, clip_low=0.05, clip_high=0.05
            )
            out[ratio] = jax.grad(
                lambda lp, cfg=cfg: policy_loss(lp, d["old"], adv, d["mask"], norm, cfg)[0]
            )(logp)
        return out

    grad = jax.tree.map(np.asarray, grads(d["logp"])).__getitem__

    s = np.exp(np.sum((d["logp"] - d["old"]) * m, 1) / n)
    active = np.clip(s, 0.95, 1.05) * adv_rows < s * adv_rows
    assert active.any() and not active[m.sum(1) > 0].all()
    # token weight of the aggregation: 1 / norm (token_mean) or 1 / (n_i norm) (sequence_mean)
    weight = m / norm if aggregation == "token_mean" else m / n[:, None] / norm
    # GSPO: every token of row i carries -s_i A_i; d s_i / d logp_ik = s_i m_ik / n_i
    row_total = np.sum(weight, 1) * np.where(active, 0.0, -adv_rows)
    np.testing.assert_allclose(
        grad("sequence"), row_total[:, None] * s[:, None] * m / n[:, None], rtol=1e-4, atol=1e-8
    )
    # GSPO-token: -sg(s_i) A_i per token, with the token's own weight
    expected_token = np.where(active, 0.0, -s * adv_rows)[:, None] * weight
    np.testing.assert_allclose(grad("sequence_token"), expected_token, rtol=1e-4, atol=1e-8)
    if aggregation == "sequence_mean":  # the two coincide here
        np.testing.assert_allclose(grad("sequence"), grad("sequence_token"), rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize(
    "cfg",
    [
        PolicyLossConfig(aggregation="token_mean", kl_coef=0.1, entropy_coef=0.01),
        PolicyLossConfig(aggregation="sequence_mean", ratio="sequence", importance_cap=2.0),
        PolicyLossConfig(aggregation="sequence_sum_constant", ratio="sequence_token"),
    ],
    ids=["token_mean", "sequence_mean", "sequence_sum_constant"],
)
def test_policy_loss_micro_batch_invariance(cfg):
    d = _batch(seed=4)
    norm = _normalizer(d["mask"], cfg.aggregation)
    keys = ("logp", "old", "adv", "mask", "ref", "behaviour", "entropy")

    def share(logp, old, adv, mask, ref, behaviour, entropy):
        return policy_loss(
            logp,
            old,
            adv,
            mask,
            norm,
            cfg,
            ref_logp=ref,
            behaviour_logp=behaviour,
            entropy=entropy,
        )

    fn = jax.jit(jax.value_and_grad(share, has_aux=True))
    (whole, whole_metrics), whole_grad = fn(*(d[k] for k in keys))

    def padded(rows):  # the slice's rows in place, every other row empty (same shape: no compile)
        return {k: d[k] * np.isin(np.arange(4), rows)[:, None] for k in keys}

    # two slices of two rows each, then four of one row (padded to the whole shape)
    splits = [[(rows, {k: d[k][rows] for k in keys}) for rows in ([0, 1], [2, 3])]]
    splits.append([(np.arange(4), padded([i])) for i in range(4)])
    for split in splits:
        total, grad, metrics = 0.0, np.zeros_like(d["logp"]), {}
        for rows, part in split:
            (loss, m), g = fn(*(part[k] for k in keys))
            total += float(loss)
            grad[rows] += np.asarray(g)
            for k, v in m.items():
                metrics[k] = metrics.get(k, 0.0) + float(v)
        np.testing.assert_allclose(total, whole, rtol=1e-5)
        np.testing.assert_allclose(grad, whole_grad, rtol=1e-5, atol=1e-8)
        for k, v in whole_metrics.items():
            np.testing.assert_allclose(metrics[k], v, rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("ratio", ["token", "sequence", "sequence_token"])
def test_on_policy_ratio_is_exactly_one(ratio):
    d = _batch(seed=5)
    cfg = PolicyLossConfig(ratio=ratio, clip_low=0.0, clip_high=0.0)
    norm = float(_normalizer(d["mask"], "token_mean"))
    (loss, metrics), grad = jax.jit(
        jax.value_and_grad(
            lambda lp: policy_loss(lp, d["old"], d["adv"], d["mask"], norm, cfg), has_aux=True
        )
    )(d["old"])
    assert float(metrics["ratio_sum"]) == float(metrics["completion_tokens"]) == 11.0
    assert float(metrics["clipped_tokens"]) == 0.0
    assert float(metrics["log_ratio_abs_sum"]) == 0.0
    assert float(metrics["approx_kl_sum"]) == 0.0
    np.testing.assert_allclose(loss, -np.sum(d["adv"] * d["mask"]) / norm, rtol=1e-6)
    # the full (unclipped) gradient, even with a zero clip range
    if ratio == "sequence":  # d s_i / d logp_ik = m_ik / n_i: the row's advantage sum spread
        n = np.maximum(d["mask"].sum(1, keepdims=True), 1)
        expected = -np.sum(d["adv"] * d["mask"], 1, keepdims=True) * d["mask"] / n / norm
    else:  # per token: -A / norm
        expected = -d["adv"] * d["mask"] / norm
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_policy_loss_ignores_non_finite_padding():
    d = _batch(seed=6)
    pad = d["mask"] == 0
    dirty = {k: np.where(pad, NAN, v).astype(np.float32) for k, v in d.items() if k != "mask"}
    cfg = PolicyLossConfig(ratio="sequence_token", kl_coef=0.1, entropy_coef=0.1, importance_cap=2)
    args = dict(ref_logp=dirty["ref"], behaviour_logp=dirty["behaviour"], entropy=dirty["entropy"])
    loss, grad = jax.jit(
        jax.value_and_grad(
            lambda lp: policy_loss(lp, dirty["old"], dirty["adv"], d["mask"], 11.0, cfg, **args)[0]
        )
    )(dirty["logp"])
    assert np.isfinite(float(loss)) and np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[pad] == 0.0)


def test_policy_loss_missing_inputs():
    d = _batch()
    args = (d["logp"], d["old"], d["adv"], d["mask"], 1.0)
    with pytest.raises(ValueError, match=re.escape("policy.kl_coef=0.1 > 0 needs ref_logp")):
        policy_loss(*args, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(
        ValueError, match=re.escape("policy.importance_cap=2.0 needs behaviour_logp")
    ):
        policy_loss(*args, PolicyLossConfig(importance_cap=2.0))
    with pytest.raises(ValueError, match=re.escape("policy.entropy_coef=0.01 > 0 needs entropy")):
        policy_loss(*args, PolicyLossConfig(entropy_coef=0.01))


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("ratio", "sentence", "one of ('token', 'sequence', 'sequence_token')"),
        ("clip_low", -0.1, "a number in [0, 1]"),
        ("clip_low", 1.5, "a number in [0, 1]"),
        ("clip_high", -0.2, "a number >= 0"),
        ("clip_high", "0.2", "a number >= 0"),
        ("aggregation", "mean", "one of ('token_mean', 'sequence_mean', 'sequence_sum_constant')"),
        ("kl_coef", -1.0, "a number >= 0"),
        ("kl_estimator", "k4", "one of ('k1', 'k2', 'k3')"),
        ("entropy_coef", -0.01, "a number >= 0"),
        ("importance_cap", 0.0, "None or a number > 0"),
        ("importance_cap", True, "None or a number > 0"),
    ],
)
def test_policy_config_errors(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        PolicyLossConfig(**{field: value})
    assert str(info.value) == f"policy.{field}={value!r} is invalid: {allowed}"


# ---------------------------------------------------------------- value loss


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_value_loss_matches_numpy(clip, aggregation):
    rng = np.random.default_rng(7)
    mask = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], np.float32)
    old = rng.normal(size=mask.shape).astype(np.float32)
    values = (old + rng.normal(0, 0.4, size=mask.shape)).astype(np.float32)
    returns = rng.normal(size=mask.shape).astype(np.float32)
    norm = float(_normalizer(mask, aggregation))
    (loss, metrics), grad = jax.jit(
        jax.value_and_grad(
            lambda v: value_loss(v, old, returns, mask, norm, clip=clip, aggregation=aggregation),
            has_aux=True,
        )
    )(values)
    error = (values.astype(np.float64) - returns) ** 2
    if clip is None:
        per_token, clipped, active = error, 0.0, np.zeros(mask.shape, bool)
    else:
        clipped_error = (old + np.clip(values - old, -clip, clip) - returns) ** 2
        active = (np.abs(values - old) > clip) & (clipped_error > error)
        per_token = np.where(active, clipped_error, error)
        clipped = np.sum(active * mask)
        assert 0 < clipped < mask.sum()
    expected = _np_aggregate(0.5 * per_token, mask, aggregation, norm)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    assert float(metrics["value_clipped_tokens"]) == clipped
    np.testing.assert_allclose(metrics["value_error_sum"], np.sum(error * mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["value_sum"], np.sum(values * mask), rtol=1e-5)
    np.testing.assert_allclose(metrics["value_loss"], expected, rtol=1e-5)
    # gradient: (v - R) times the token's weight; 0 where the clipped term (constant in v) is taken
    n = np.maximum(mask.sum(1, keepdims=True), 1)
    weight = mask / norm if aggregation == "token_mean" else mask / n / norm
    expected_grad = np.where(active, 0.0, values - returns) * weight
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-8)


def test_value_loss_errors():
    args = (np.zeros((1, 2)),) * 4 + (1.0,)
    with pytest.raises(ValueError, match="clip=0 is invalid: None or a number > 0"):
        value_loss(*args, clip=0)
    with pytest.raises(ValueError, match="aggregation='mean' is invalid"):
        value_loss(*args, clip=None, aggregation="mean")


def test_inputs_may_be_jax_or_numpy():
    d = _batch()
    cfg = PolicyLossConfig()
    a, _ = policy_loss(d["logp"], d["old"], d["adv"], d["mask"] > 0, 12.0, cfg)
    b, _ = policy_loss(*(jnp.asarray(d[k]) for k in ("logp", "old", "adv", "mask")), 12.0, cfg)
    assert float(a) == float(b)
