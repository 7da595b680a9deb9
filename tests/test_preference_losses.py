"""Preference losses (DPO family, ORPO, SimPO, KTO, Bradley-Terry) against numpy by hand."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postax.losses.dpo import DPO_VARIANTS, DPOConfig, dpo_loss
from postax.losses.kto import KTOConfig, kto_loss, kto_reference_point
from postax.losses.orpo import ORPOConfig, orpo_loss
from postax.losses.reward import bradley_terry_loss
from postax.losses.simpo import SimPOConfig, simpo_loss
from postax.validation import ConfigError

# Four pairs of summed completion log-probs, chosen so that
# h = (pc - rc) - (pr - rr) = [1.5, -2, 1, 2].
PC = np.array([-10.0, -25.0, -7.5, -40.0])
PR = np.array([-12.0, -20.0, -9.0, -38.0])
RC = np.array([-11.0, -24.0, -8.0, -41.0])
RR = np.array([-11.5, -21.0, -8.5, -37.0])
NC = np.array([5, 10, 3, 20])
NR = np.array([6, 8, 4, 16])


def f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def np_softplus(x):
    """-log sigmoid(-x) = log(1 + exp(x)), float64."""
    return np.log1p(np.exp(np.asarray(x, np.float64)))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def np_dpo(variant, beta, eps, pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR):
    """The DPO-family losses written out in float64."""
    h = (pc - rc) - (pr - rr)
    if variant == "sigmoid":
        return (1 - eps) * np_softplus(-beta * h) + eps * np_softplus(beta * h)
    if variant == "robust":
        return ((1 - eps) * np_softplus(-beta * h) - eps * np_softplus(beta * h)) / (1 - 2 * eps)
    if variant == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if variant == "ipo":
        h_avg = (pc / nc - rc / nc) - (pr / nr - rr / nr)
        return (h_avg - 1 / (2 * beta)) ** 2
    raise AssertionError(variant)


def call_dpo(cfg, pc=PC, pr=PR, rc=RC, rr=RR, nc=NC, nr=NR):
    return dpo_loss(
        f32(pc),
        f32(pr),
        f32(rc),
        f32(rr),
        cfg,
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
    )


# ---------------------------------------------------------------- DPO family


@pytest.mark.parametrize(
    ("variant", "beta", "eps"),
    [
        ("sigmoid", 0.1, 0.0),
        ("sigmoid", 0.5, 0.2),  # cDPO
        ("robust", 0.3, 0.25),  # rDPO
        ("robust", 0.3, 0.0),
        ("hinge", 0.4, 0.0),
        ("hinge", 0.8, 0.0),  # two pairs past the hinge (beta h > 1)
        ("ipo", 0.1, 0.0),
        ("ipo", 0.5, 0.0),
    ],
)
def test_dpo_matches_numpy(variant, beta, eps):
    losses, _ = call_dpo(DPOConfig(beta=beta, variant=variant, label_smoothing=eps))
    assert losses.shape == (4,) and losses.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(losses), np_dpo(variant, beta, eps), rtol=1e-5, atol=1e-6)


def test_dpo_hand_values():
    # At h = 0 the (smoothed) sigmoid loss is log 2 whatever eps is; IPO gives (1 / (2 beta))^2.
    zero = np.zeros(1)
    for eps in (0.0, 0.1, 0.3):
        losses, _ = call_dpo(
            DPOConfig(beta=0.7, label_smoothing=eps), zero, zero, zero, zero, [1], [1]
        )
        np.testing.assert_allclose(np.asarray(losses), [np.log(2.0)], rtol=1e-6)
    losses, _ = call_dpo(DPOConfig(beta=0.25, variant="ipo"), zero, zero, zero, zero, [3], [4])
    np.testing.assert_allclose(np.asarray(losses), [4.0], rtol=1e-6)
    # hinge: 1 - 0.4 * h with h = [1.5, -2, 1, 2]
    losses, _ = call_dpo(DPOConfig(beta=0.4, variant="hinge"))
    np.testing.assert_allclose(np.asarray(losses), [0.4, 1.8, 0.6, 0.2], rtol=1e-5)


def test_ipo_uses_length_averaged_logprobs():
    # Same sums, different lengths: only IPO sees the difference.
    base = DPOConfig(beta=0.1, variant="ipo")
    short, _ = call_dpo(base, nc=np.ones(4), nr=np.ones(4))
    long, _ = call_dpo(base, nc=NC, nr=NR)
    assert not np.allclose(np.asarray(short), np.asarray(long))
    sig_short, _ = call_dpo(DPOConfig(beta=0.1), nc=np.ones(4), nr=np.ones(4))
    sig_long, _ = call_dpo(DPOConfig(beta=0.1), nc=NC, nr=NR)
    np.testing.assert_array_equal(np.asarray(sig_short), np.asarray(sig_long))


def test_robust_dpo_is_unbiased_under_label_flips():
    # Flipping a label swaps chosen and rejected; averaging the rDPO loss over
    # flips with probability eps gives back the clean DPO loss.
    eps, beta = 0.2, 0.5
    cfg = DPOConfig(beta=beta, variant="robust", label_smoothing=eps)
    kept, _ = call_dpo(cfg)
    flipped, _ = call_dpo(cfg, pc=PR, pr=PC, rc=RR, rr=RC, nc=NR, nr=NC)
    clean, _ = call_dpo(DPOConfig(beta=beta))
    np.testing.assert_allclose(
        (1 - eps) * np.asarray(kept) + eps * np.asarray(flipped), np.asarray(clean), rtol=1e-5
    )
    assert float(jnp.min(flipped)) < 0  # a single rDPO term can be negative


@pytest.mark.parametrize(
    ("variant", "eps"),
    [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_dpo_gradient_signs(variant, eps):
    # beta h = 0.2 h stays below 1 (hinge not saturated), and the averaged
    # margins stay below IPO's target 1 / (2 beta) = 2.5.
    cfg = DPOConfig(beta=0.2, variant=variant, label_smoothing=eps)

    def total(pc, pr):
        losses, _ = dpo_loss(
            pc, pr, f32(RC), f32(RR), cfg, chosen_tokens=f32(NC), rejected_tokens=f32(NR)
        )
        return jnp.sum(losses)

    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR))
    assert np.all(np.asarray(g_chosen) < 0), g_chosen
    assert np.all(np.asarray(g_rejected) > 0), g_rejected


def test_dpo_metrics():
    _, m = call_dpo(DPOConfig(beta=0.1, variant="hinge"))
    np.testing.assert_allclose(np.asarray(m["reward_chosen"]), [0.1, -0.1, 0.05, 0.1], rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(m["reward_rejected"]), [-0.05, 0.1, -0.05, -0.1], rtol=1e-5
    )
    np.testing.assert_allclose(np.asarray(m["margin"]), [0.15, -0.2, 0.1, 0.2], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["accuracy"]), [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(m["logp_chosen"]), PC)
    np.testing.assert_array_equal(np.asarray(m["logp_rejected"]), PR)
    assert all(v.shape == (4,) and v.dtype == jnp.float32 for v in m.values())


# ---------------------------------------------------------------- ORPO


def np_log_odds(a):
    a = np.minimum(np.asarray(a, np.float64), -1e-6)
    return a - np.log(1.0 - np.exp(a))


def np_orpo(lam, pc, pr, nc, nr):
    a_c, a_r = pc / nc, pr / nr
    ratio = np_log_odds(a_c) - np_log_odds(a_r)
    return -a_c + lam * np_softplus(-ratio), ratio


def test_orpo_matches_numpy():
    pc = np.array([-10.0, -25.0, -2e-5, -3.0])
    pr = np.array([-18.0, -20.0, -9.0, -2.0])
    nc = np.array([5, 10, 2, 3])  # a_chosen = [-2, -2.5, -1e-5 (close to 0), -1]
    nr = np.array([6, 8, 4, 1])  # a_rejected = [-3, -2.5, -2.25, -2]
    lam = 0.25
    losses, m = orpo_loss(
        f32(pc),
        f32(pr),
        chosen_tokens=jnp.asarray(nc),
        rejected_tokens=jnp.asarray(nr),
        cfg=ORPOConfig(weight=lam),
    )
    want, ratio = np_orpo(lam, pc, pr, nc, nr)
    # atol 1e-4 on log odds near a = -1e-5 fails a naive float32 log(1 - exp(a)).
    np.testing.assert_allclose(np.asarray(m["log_odds_ratio"]), ratio, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(m["nll"]), -pc / nc, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["reward_chosen"]), lam * pc / nc, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["reward_rejected"]), lam * pr / nr, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["margin"]), lam * (pc / nc - pr / nr), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(m["accuracy"]), [1.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(m["logp_chosen"]), f32(pc))
    assert all(v.shape == (4,) and v.dtype == jnp.float32 for v in m.values())


def test_orpo_clamps_mean_logp_at_zero():
    # a = 0 (and a = +1e-7 from rounding) would give log(0) or log(<0) unclamped.
    pc = np.array([0.0, 3e-7, -4.0])
    pr = np.array([-3.0, -3.0, 0.0])
    nc, nr = np.array([4, 3, 2]), np.array([3, 3, 1])
    cfg = ORPOConfig(weight=0.5)
    losses, m = orpo_loss(
        f32(pc), f32(pr), chosen_tokens=jnp.asarray(nc), rejected_tokens=jnp.asarray(nr), cfg=cfg
    )
    assert np.all(np.isfinite(np.asarray(losses))) and np.all(
        np.isfinite(np.asarray(m["log_odds_ratio"]))
    )
    want, ratio = np_orpo(0.5, pc, pr, nc, nr)
    np.testing.assert_allclose(np.asarray(m["log_odds_ratio"]), ratio, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-4, atol=1e-6)

    def total(pc_):
        losses, _ = orpo_loss(pc_, f32(pr), chosen_tokens=f32(nc), rejected_tokens=f32(nr), cfg=cfg)
        return jnp.sum(losses)

    grad = np.asarray(jax.grad(total)(f32(pc)))
    assert np.all(np.isfinite(grad))
    # Clamped rows keep the gradient of the NLL term, -1 / tokens.
    np.testing.assert_allclose(grad[:2], -1.0 / nc[:2], rtol=1e-6)


def test_orpo_gradient_signs():
    pc, pr = f32([-10.0, -3.0, -30.0]), f32([-12.0, -2.0, -20.0])
    nc, nr = f32([5, 6, 10]), f32([6, 2, 8])
    cfg = ORPOConfig(weight=0.1)

    def total(pc, pr):
        return jnp.sum(orpo_loss(pc, pr, chosen_tokens=nc, rejected_tokens=nr, cfg=cfg)[0])

    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(pc, pr)
    assert np.all(np.asarray(g_chosen) < 0) and np.all(np.asarray(g_rejected) > 0)


def test_padding_rows_stay_finite():
    # A padding row (no completion tokens, logp 0) must not give NaN or inf,
    # since the caller multiplies it by 0 and NaN * 0 is still NaN.
    zeros, ones = f32([0.0, -6.0]), f32([0.0, -4.0])
    tokens = jnp.asarray([0, 3])
    calls = [
        lambda pc: orpo_loss(
            pc, ones, chosen_tokens=tokens, rejected_tokens=tokens, cfg=ORPOConfig()
        ),
        lambda pc: simpo_loss(
            pc, ones, chosen_tokens=tokens, rejected_tokens=tokens, cfg=SimPOConfig()
        ),
        lambda pc: dpo_loss(
            pc,
            ones,
            zeros,
            ones,
            DPOConfig(variant="ipo"),
            chosen_tokens=tokens,
            rejected_tokens=tokens,
        ),
    ]
    for call in calls:
        losses, metrics = call(zeros)
        grad = jax.grad(lambda pc, call=call: jnp.sum(call(pc)[0]))(zeros)
        for value in (losses, grad, *metrics.values()):
            assert np.all(np.isfinite(np.asarray(value))), value


# ---------------------------------------------------------------- SimPO


def test_simpo_matches_numpy_and_metrics():
    beta, gamma = 2.5, 1.375
    losses, m = simpo_loss(
        f32(PC),
        f32(PR),
        chosen_tokens=jnp.asarray(NC),
        rejected_tokens=jnp.asarray(NR),
        cfg=SimPOConfig(beta=beta, gamma=gamma),
    )
    r_c, r_r = beta * PC / NC, beta * PR / NR
    np.testing.assert_allclose(np.asarray(losses), np_softplus(-(r_c - r_r - gamma)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(m["reward_chosen"]), r_c, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["reward_rejected"]), r_r, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(m["margin"]), r_c - r_r, rtol=1e-5)
    # a_chosen = [-2, -2.5, -2.5, -2], a_rejected = [-2, -2.5, -2.25, -2.375]: two ties.
    np.testing.assert_array_equal(np.asarray(m["accuracy"]), [0.0, 0.0, 0.0, 1.0])
    np.testing.assert_array_equal(np.asarray(m["logp_rejected"]), PR)
    assert all(v.shape == (4,) and v.dtype == jnp.float32 for v in m.values())
    # A tie at the target margin costs log 2 ...
    tie, _ = simpo_loss(
        f32([0.0]),
        f32([0.0]),
        chosen_tokens=f32([1]),
        rejected_tokens=f32([1]),
        cfg=SimPOConfig(gamma=0.0),
    )
    np.testing.assert_allclose(np.asarray(tie), [np.log(2.0)], rtol=1e-6)


def test_simpo_gradient_signs():
    cfg = SimPOConfig()

    def total(pc, pr):
        return jnp.sum(
            simpo_loss(pc, pr, chosen_tokens=f32(NC), rejected_tokens=f32(NR), cfg=cfg)[0]
        )

    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(f32(PC), f32(PR))
    assert np.all(np.asarray(g_chosen) < 0) and np.all(np.asarray(g_rejected) > 0)


# ---------------------------------------------------------------- KTO

KTO_POLICY = np.array([-10.0, -12.0, -8.0, -20.0, -5.0])
KTO_REF = np.array([-11.0, -11.0, -9.0, -19.0, -5.0])
KTO_DESIRABLE = np.array([1.0, 0.0, 1.0, 0.0, 1.0])


def test_kto_reference_point():
    z0 = kto_reference_point(f32([-3.0, -5.0, -2.0]), f32([-4.0, -4.5, -2.5]))
    assert z0.shape == () and z0.dtype == jnp.float32
    np.testing.assert_allclose(float(z0), 1.0 / 3.0, rtol=1e-6)  # mean of [1, -0.5, 0.5]
    assert float(kto_reference_point(f32([-5.0, -6.0]), f32([-4.0, -4.0]))) == 0.0  # clamped at 0
    # Masked rows (padding, even with non-finite log-probs) are left out of the mean.
    masked = kto_reference_point(
        f32([-3.0, -5.0, -2.0, np.nan]), f32([-4.0, -4.5, -2.5, 0.0]), jnp.asarray([1, 0, 1, 0])
    )
    np.testing.assert_allclose(float(masked), 0.75, rtol=1e-6)  # mean of [1, 0.5]
    assert float(kto_reference_point(f32([1.0]), f32([0.0]), jnp.zeros(1))) == 0.0
    grad = jax.grad(lambda p: kto_reference_point(p, f32([-4.0, -4.5, -2.5])))(
        f32([-3.0, -5.0, -2.0])
    )
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_kto_matches_numpy_and_metrics():
    beta, lam_d, lam_u, z0 = 0.5, 1.0, 1.5, 0.4
    cfg = KTOConfig(beta=beta, desirable_weight=lam_d, undesirable_weight=lam_u)
    for desirable in (f32(KTO_DESIRABLE), jnp.asarray(KTO_DESIRABLE > 0)):
        losses, m = kto_loss(f32(KTO_POLICY), f32(KTO_REF), desirable, f32(z0), cfg)
        r = KTO_POLICY - KTO_REF  # [1, -1, 1, -1, 0]
        want = np.where(
            KTO_DESIRABLE > 0,
            lam_d * (1 - np_sigmoid(beta * (r - z0))),
            lam_u * (1 - np_sigmoid(beta * (z0 - r))),
        )
        np.testing.assert_allclose(np.asarray(losses), want, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(m["reward"]), [0.5, -0.5, 0.5, -0.5, 0.0], atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(m["reward_desirable"]), [0.5, 0.0, 0.5, 0.0, 0.0], atol=1e-6
        )
        np.testing.assert_allclose(
            np.asarray(m["reward_undesirable"]), [0.0, -0.5, 0.0, -0.5, 0.0], atol=1e-6
        )
        np.testing.assert_array_equal(np.asarray(m["desirable"]), KTO_DESIRABLE)
        np.testing.assert_allclose(np.asarray(m["kl"]), np.full(5, z0), rtol=1e-6)
        assert all(v.shape == (5,) and v.dtype == jnp.float32 for v in m.values())


def test_kto_gradient_signs_and_no_gradient_through_reference_point():
    cfg = KTOConfig(beta=0.1, desirable_weight=1.0, undesirable_weight=1.33)

    def total(policy, z0):
        return jnp.sum(kto_loss(policy, f32(KTO_REF), f32(KTO_DESIRABLE), z0, cfg)[0])

    g_policy, g_z0 = jax.grad(total, argnums=(0, 1))(f32(KTO_POLICY), f32(0.2))
    g = np.asarray(g_policy)
    assert np.all(g[KTO_DESIRABLE > 0] < 0) and np.all(g[KTO_DESIRABLE == 0] > 0), g
    assert float(g_z0) == 0.0


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_matches_numpy_and_metrics():
    rc, rr, margin = (
        np.array([1.0, -0.5, 2.0, 0.3]),
        np.array([0.0, 0.5, 2.0, -1.2]),
        np.array([0.5, 0.0, 1.0, 2.0]),
    )
    losses, m = bradley_terry_loss(f32(rc), f32(rr))
    np.testing.assert_allclose(np.asarray(losses), np_softplus(-(rc - rr)), rtol=1e-6)
    with_margin, m2 = bradley_terry_loss(f32(rc), f32(rr), f32(margin))
    np.testing.assert_allclose(np.asarray(with_margin), np_softplus(-(rc - rr - margin)), rtol=1e-6)
    np.testing.assert_allclose(
        float(with_margin[2]), np.log1p(np.e), rtol=1e-6
    )  # tie, m = 1: log(1 + e)
    for metrics in (m, m2):
        np.testing.assert_array_equal(np.asarray(metrics["reward_chosen"]), f32(rc))
        np.testing.assert_array_equal(np.asarray(metrics["reward_rejected"]), f32(rr))
        np.testing.assert_allclose(np.asarray(metrics["margin"]), [1.0, -1.0, 0.0, 1.5], rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(metrics["accuracy"]), [1.0, 0.0, 0.0, 1.0])
        assert all(v.shape == (4,) and v.dtype == jnp.float32 for v in metrics.values())


def test_bradley_terry_gradient_signs():
    def total(rc, rr):
        return jnp.sum(bradley_terry_loss(rc, rr, f32([0.5, 0.0, 1.0]))[0])

    g_chosen, g_rejected = jax.grad(total, argnums=(0, 1))(
        f32([1.0, -0.5, 2.0]), f32([0.0, 0.5, 2.0])
    )
    assert np.all(np.asarray(g_chosen) < 0) and np.all(np.asarray(g_rejected) > 0)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: DPOConfig(beta=0.0), "beta"),
        (lambda: DPOConfig(beta="0.1"), "beta"),
        (lambda: DPOConfig(variant="kto"), "variant"),
        (lambda: DPOConfig(label_smoothing=0.5), "label_smoothing"),
        (lambda: DPOConfig(label_smoothing=-0.1), "label_smoothing"),
        (lambda: DPOConfig(variant="hinge", label_smoothing=0.1), "label_smoothing"),
        (lambda: DPOConfig(variant="ipo", label_smoothing=0.1), "label_smoothing"),
        (lambda: ORPOConfig(weight=-0.1), "weight"),
        (lambda: ORPOConfig(weight=True), "weight"),
        (lambda: SimPOConfig(beta=-2.0), "beta"),
        (lambda: SimPOConfig(gamma=-0.5), "gamma"),
        (lambda: KTOConfig(beta=0), "beta"),
        (lambda: KTOConfig(desirable_weight=0.0), "desirable_weight"),
        (lambda: KTOConfig(undesirable_weight=-1.0), "undesirable_weight"),
    ],
)
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ConfigError, match=rf"Config\.{field}="):
        make()


def test_configs_are_frozen_keyword_only_and_accept_valid_values():
    for variant in DPO_VARIANTS:
        DPOConfig(variant=variant)
    DPOConfig(variant="sigmoid", label_smoothing=0.1)
    DPOConfig(variant="robust", label_smoothing=0.49)
    for cls in (DPOConfig, ORPOConfig, SimPOConfig, KTOConfig):
        cfg = cls()
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.beta = 1.0  # type: ignore[misc]
        with pytest.raises(TypeError):
            cls(0.5)


# ---------------------------------------------------------------- jit


def test_every_loss_runs_under_jit():
    nc, nr = jnp.asarray(NC), jnp.asarray(NR)
    for variant, eps in (("sigmoid", 0.1), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)):
        cfg = DPOConfig(beta=0.2, variant=variant, label_smoothing=eps)
        fn = jax.jit(dpo_loss, static_argnames="cfg")
        got, gm = fn(
            f32(PC), f32(PR), f32(RC), f32(RR), cfg=cfg, chosen_tokens=nc, rejected_tokens=nr
        )
        np.testing.assert_allclose(np.asarray(got), np_dpo(variant, 0.2, eps), rtol=1e-5, atol=1e-6)
        assert set(gm) == {
            "reward_chosen",
            "reward_rejected",
            "margin",
            "accuracy",
            "logp_chosen",
            "logp_rejected",
        }
    for loss, cfg in ((orpo_loss, ORPOConfig()), (simpo_loss, SimPOConfig())):
        jitted = jax.jit(functools.partial(loss, cfg=cfg))
        got, _ = jitted(f32(PC), f32(PR), chosen_tokens=nc, rejected_tokens=nr)
        want, _ = loss(f32(PC), f32(PR), chosen_tokens=nc, rejected_tokens=nr, cfg=cfg)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    kto = jax.jit(functools.partial(kto_loss, cfg=KTOConfig()))
    z0 = jax.jit(kto_reference_point)(f32(KTO_POLICY), f32(KTO_REF))
    got, _ = kto(f32(KTO_POLICY), f32(KTO_REF), f32(KTO_DESIRABLE), z0)
    want, _ = kto_loss(f32(KTO_POLICY), f32(KTO_REF), f32(KTO_DESIRABLE), z0, KTOConfig())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    got, _ = jax.jit(bradley_terry_loss)(f32([1.0, 0.0]), f32([0.0, 1.0]), f32([0.5, 0.5]))
    np.testing.assert_allclose(np.asarray(got), np_softplus(-np.array([0.5, -1.5])), rtol=1e-6)
