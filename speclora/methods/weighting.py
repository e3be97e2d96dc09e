"""The math of the multi-task weighting methods, as pure functions: FAMO's weights and logit update, CAGrad's
and Nash-MTL's combinations of per-task gradients.

CAGrad and Nash-MTL combine the per-task gradients g_t ∈ R^P (rows of G, (S, P)) as d = Σ_t β_t g_t, with
coefficients β that depend on G only through its Gram matrix K = G Gᵀ (S × S). The functions here take K, so
that a step computes K once (one pass over the P coordinates), solves a problem of size S on the host, and
forms d = βᵀG; under DDP every rank holds the same all-reduced G, hence the same K, β and d.

- :func:`famo_weights`, :func:`famo_logit_grad`, :func:`adam_update`: FAMO (Liu et al., NeurIPS 2023,
  "FAMO: Fast Adaptive Multitask Optimization", Algorithm 1).
- :func:`cagrad_coefficients`, :func:`cagrad_direction`: CAGrad (Liu et al., NeurIPS 2021, "Conflict-Averse
  Gradient Descent for Multi-task Learning", eq. 4 and its dual).
- :func:`nash_coefficients`: Nash-MTL (Navon et al., ICML 2022, "Multi-Task Learning as a Bargaining Game",
  Theorem 5.1: Gᵀ G α = 1/α).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = ["adam_update", "cagrad_coefficients", "cagrad_direction", "conflict_share", "famo_logit_grad",
           "famo_weights", "nash_coefficients"]


# ---------------------------------------------------------------------- FAMO
def famo_weights(logits: Tensor, losses: Tensor, present: Tensor, eps: float = 1e-8) -> Tensor:
    """(T,) FAMO's loss weights w: the step's gradient Σ_t w_t ∇ℓ_t is FAMO's d = Σ_t c z_t ∇ℓ_t / ℓ_t.

        z = softmax(ξ) over the present tasks S      (0 elsewhere)
        D_t = ℓ_t + eps                               (ℓ_t ≥ 0, the minimum loss ℓ* taken as 0)
        c = (Σ_{t∈S} z_t / D_t)^{-1}
        w_t = c z_t / D_t                             (0 outside S; detached: a weight, not a function of θ)

    so that Σ_t w_t ∇ℓ_t = ∇_θ Σ_t c z_t log D_t, the gradient of FAMO's weighted log-loss.

    Args:
        logits: (T,) ξ. losses: (T,) ℓ_t ≥ 0 (any value where absent). present: (T,) bool, the tasks S.
    """
    z = masked_softmax(logits, present)  # (T,)
    d = torch.where(present, losses.detach() + eps, torch.ones_like(losses))  # (T,) D_t; 1 where absent
    ratio = z / d  # (T,) z_t / D_t, 0 outside S
    c = 1.0 / ratio.sum().clamp_min(torch.finfo(ratio.dtype).tiny)  # () c = (Σ z_t / D_t)^{-1}
    return (c * ratio).detach()  # (T,)


def masked_softmax(logits: Tensor, present: Tensor) -> Tensor:
    """(T,) softmax of ``logits`` over the entries where ``present`` (0 elsewhere; all 0 if none)."""
    masked = torch.where(present, logits, torch.full_like(logits, -math.inf))  # (T,)
    z = torch.softmax(masked, dim=0)  # (T,) NaN everywhere if nothing is present
    return torch.where(present, z, torch.zeros_like(z))


def famo_logit_grad(logits: Tensor, delta: Tensor, mask: Tensor) -> Tensor:
    """(T,) ∇_ξ zᵀδ with z = softmax(ξ) over the tasks of ``mask`` (0 elsewhere): FAMO's logit gradient.

    δ_t = log ℓ_t(θ_k) − log ℓ_t(θ_{k+1}) is how much task t's log-loss fell over the step; descending on
    zᵀδ moves weight from the tasks that improved most to those that improved least. Softmax Jacobian:

        ∂(zᵀδ)/∂ξ_t = z_t (δ_t − zᵀδ)       t ∈ mask;   0 elsewhere
    """
    z = masked_softmax(logits, mask)  # (T,)
    delta = torch.where(mask, delta, torch.zeros_like(delta))  # (T,)
    return z * (delta - (z * delta).sum())  # (T,)


def adam_update(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: float,
                betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One Adam step in place (torch.optim.Adam's update, L2 weight decay added to the gradient), with the step
    count a device tensor, so that the update reads nothing back from the device::

        g ← g + γ ξ;  m ← β₁ m + (1 − β₁) g;  v ← β₂ v + (1 − β₂) g²;  k ← k + 1
        ξ ← ξ − lr · (m / (1 − β₁^k)) / (√(v / (1 − β₂^k)) + eps)
    """
    b1, b2 = betas
    g = grad + weight_decay * param  # (T,)
    exp_avg.mul_(b1).add_(g, alpha=1 - b1)
    exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
    step.add_(1)
    k = step.to(param.dtype)  # ()
    m_hat = exp_avg / (1 - b1 ** k)  # (T,)
    v_hat = exp_avg_sq / (1 - b2 ** k)  # (T,)
    param.sub_(lr * m_hat / (v_hat.sqrt() + eps))


# ---------------------------------------------------------------------- conflicts
def conflict_share(gram: np.ndarray) -> float | None:
    """The share of task pairs whose gradients have cos < 0 (DESIGN.md, "Measures"), from the Gram matrix;
    None for fewer than two tasks."""
    s = gram.shape[0]
    if s < 2:
        return None
    pairs = [(i, j) for i in range(s) for j in range(i + 1, s)]
    return sum(gram[i, j] < 0 for i, j in pairs) / len(pairs)


# ---------------------------------------------------------------------- CAGrad
def cagrad_coefficients(gram: np.ndarray, c: float, rescale: bool = True) -> np.ndarray:
    """(S,) β with CAGrad's direction d = Σ_t β_t g_t, from the Gram matrix K = G Gᵀ of the task gradients.

    CAGrad maximises the worst task's local improvement within a ball around the average gradient g₀:

        max_d min_t ⟨g_t, d⟩   s.t.  ‖d − g₀‖ ≤ c ‖g₀‖,      g₀ = (1/S) Σ_t g_t

    Its dual is a problem over the simplex Δ_S (the paper's eq. 4, b = 1/S, φ = c² ‖g₀‖²):

        w* = argmin_{w ∈ Δ_S}  wᵀ K b + √φ · √(wᵀ K w)
        d  = g₀ + (√φ / ‖g_w*‖) g_w*,        g_w = Σ_t w_t g_t,  ‖g_w‖² = wᵀ K w

    so β = b + (√φ / ‖g_w*‖) w*, divided by (1 + c²) with ``rescale`` (the reference code's default, which
    keeps the step's size near g₀'s). c = 0 gives g₀. The simplex problem (convex: a linear term plus a norm
    of a linear map) is solved by scipy's SLSQP in float64 from w = b, deterministically, so every rank that
    holds the same K gets the same β. A zero Gram matrix (no gradient) gives β = b.
    """
    from scipy.optimize import minimize

    k = np.asarray(gram, dtype=np.float64)  # (S, S)
    s = k.shape[0]
    b = np.full(s, 1.0 / s)  # (S,)
    g0_sq = float(b @ k @ b)  # ‖g₀‖² = bᵀ K b
    if s == 1 or c == 0 or not g0_sq > 0:
        beta = b
    else:
        root_phi = c * math.sqrt(g0_sq)  # √φ = c ‖g₀‖
        kb = k @ b  # (S,)
        scale = float(np.abs(k).max())  # the objective in units of K's largest entry: SLSQP's tolerances are absolute

        def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
            norm = math.sqrt(max(float(w @ k @ w), 0.0) + 1e-30)  # ‖g_w‖
            value = float(w @ kb) + root_phi * norm
            grad = kb + root_phi * (k @ w) / norm  # (S,)
            return value / scale, grad / scale

        res = minimize(objective, b, jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * s,
                       constraints=({"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(s)},),
                       options={"ftol": 1e-14, "maxiter": 200})
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()  # (S,) on the simplex
        gw_norm = math.sqrt(max(float(w @ k @ w), 0.0))  # ‖g_w*‖
        beta = b + (root_phi / gw_norm) * w if gw_norm > 0 else b  # (S,)
    return beta / (1.0 + c * c) if rescale else beta


def cagrad_direction(grads: Tensor, c: float, rescale: bool = True) -> Tensor:
    """(P,) CAGrad's direction from (S, P) task gradients (see :func:`cagrad_coefficients`)."""
    g = grads.double()  # (S, P)
    beta = cagrad_coefficients((g @ g.T).cpu().numpy(), c, rescale)  # (S,)
    return (torch.from_numpy(beta).to(g.device) @ g).to(grads.dtype)  # (P,) d = βᵀ G


# ---------------------------------------------------------------------- Nash-MTL
def nash_coefficients(gram: np.ndarray, normalize: bool = True, ridge: float = 1e-8, tol: float = 1e-10,
                      max_iter: int = 100) -> tuple[np.ndarray, bool]:
    """(S,) α > 0 of the Nash bargaining solution d = Σ_t α_t g_t, and whether the solve converged.

    Nash-MTL (Theorem 5.1): the bargaining solution over the ball is d = G α with

        (K α)_t = 1 / α_t   for every t,     K = G Gᵀ           (each task's utility ⟨g_t, d⟩ = 1/α_t)

    That is the stationarity condition of the strictly convex potential

        f(α) = ½ αᵀ K α − Σ_t log α_t,    ∇f = K α − 1/α,    ∇²f = K + diag(1/α²) ≻ 0

    whose unique minimiser is found here by damped Newton steps (backtracking keeps α > 0 and f decreasing),
    to ‖∇f‖_∞ ≤ tol. The paper solves the same condition by a sequence of convex programs (CCP, cvxpy); Newton
    on f reaches it to machine precision in ~10 steps for S ≤ 10, without a solver dependency.

    ``normalize`` (the reference code's choice): K is divided by its Frobenius norm first, so that α does not
    scale with the gradients and d = G α scales with them (with the exact K, ‖d‖² = αᵀKα = S for any
    gradients). ``ridge``: ε added to K's diagonal (relative to the normalised K), so that f stays bounded
    below when the gradients are linearly dependent (two exactly opposed tasks): there the bargaining problem
    has no solution, and α grows to ~1/√ε along the dependent direction while d stays finite.
    """
    k = np.asarray(gram, dtype=np.float64)  # (S, S)
    s = k.shape[0]
    if not np.isfinite(k).all():
        return np.full(s, np.nan), False
    norm = float(np.linalg.norm(k)) if normalize else 1.0
    if not norm > 0:  # every gradient is zero: any α gives d = 0
        return np.ones(s), True
    k = k / norm + ridge * np.eye(s)  # (S, S)
    alpha = 1.0 / np.sqrt(np.diag(k))  # (S,) the solution when the gradients are orthogonal

    def f(a: np.ndarray) -> float:
        return 0.5 * float(a @ k @ a) - float(np.log(a).sum())

    converged = False
    for _ in range(max_iter):
        grad = k @ alpha - 1.0 / alpha  # (S,) ∇f
        if np.abs(grad).max() <= tol:
            converged = True
            break
        hess = k + np.diag(1.0 / alpha ** 2)  # (S, S)
        step = -np.linalg.solve(hess, grad)  # (S,) Newton direction
        t, f0, slope = 1.0, f(alpha), float(grad @ step)
        while True:  # backtracking (Armijo), staying inside α > 0
            cand = alpha + t * step
            if (cand > 0).all() and f(cand) <= f0 + 0.25 * t * slope:
                break
            t *= 0.5
            if t < 1e-12:
                break
        if t < 1e-12:
            break
        alpha = cand
    return alpha, converged
