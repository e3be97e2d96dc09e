"""The filters' responses on one shape class, from one refresh to the next (shared/DESIGN.md, "Using the
spectrum"; docs/method.md, "The whole spectrum").

With L = Σ_i λ_i u_i u_iᵀ, a response h(λ) acts on a signal G (n, p) as Σ_i h_i u_i u_iᵀ G. Two responses:

    gradient  h_g(i) = c_i · b(λ_i)      coordination c_i = 1 on the low band, ε on the rest (§3.3);
                                          band filter b = Table 3's coefficient of λ_i's band
    update    h_u(i) = e(λ_i) · l_i      per-eigencomponent rates e(λ) = 1 + β exp(−λ/σ) (§3.3);
                                          learned coefficients l_i (the low band only; 1 elsewhere)

The low band is the k smallest eigenpairs (U_k): what LOBPCG computes, what coordination keeps and the
high-pass regulariser projects on, where coefficients are learned. Everything else is "the rest", whose
response depends on what is known of it (``rest``):

- ``spectrum`` (default): a dense solve knows every eigenpair, and the responses act on the whole spectrum.
  At a cost per step proportional to the eigenvectors whose response differs: the gradient response of the
  rest is piecewise constant, so the rest's most frequent value h_g,rest is applied to the complement of a
  basis [U_k | U_x], U_x the rest eigenvectors with any other gradient response, or with a rate more than
  ``RATE_TOL`` (relative) away from the rate of the remaining ones (taken at their mean eigenvalue). The
  gradient filter is then exact; the rates are within ``RATE_TOL``. When only k pairs are known (LOBPCG),
  the ``mean`` rule applies.
- ``mean``: the rest gets the responses at the mean of its eigenvalues, λ̄ = (tr L − Σ_{i≤k} λ_i)/(n − k)
  (tr L is the sum of L's diagonal), which lie in [λ_k, λ_max]: h_g,rest = ε·b(λ̄), h_u,rest = e(λ̄).
- ``last``: the behaviour before issue 14: h_g,rest = ε × the last band's coefficient (Table 3: 0.1),
  h_u,rest = 1; kept to compare with.

Then G' = h_rest G + U_f diag(h − h_rest) U_fᵀ G, with U_f the basis (n, m): two products of m columns.

Learned coefficients belong to eigenvectors, not to eigenvalue indices: at a refresh they follow their
eigenvectors (``carry_coefficients``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from speclora.spectral.filters import TABLE3_COEFFICIENTS, TABLE3_EDGES, band_response

REST_RULES: tuple[str, ...] = ("spectrum", "mean", "last")
RATE_TOL = 1e-2  # rest eigenvectors whose rate differs from the rest's by more than this (relative) join the basis


@dataclass(frozen=True)
class ResponseSettings:
    """What the responses are made of (the callback's options of the same names)."""

    coordination: bool = True
    epsilon: float = 0.1
    band_filter: bool = True
    band_coefficients: tuple[float, ...] = TABLE3_COEFFICIENTS
    band_edges: tuple[float, ...] | None = TABLE3_EDGES
    eigen_lr: bool = True
    beta: float = 1.0
    sigma: float = 0.2
    rest: str = "spectrum"

    def __post_init__(self) -> None:
        if self.rest not in REST_RULES:
            raise ValueError(f"rest_response={self.rest!r}; allowed: {', '.join(REST_RULES)}")

    def band(self, values: Tensor) -> Tensor:
        """b(λ) (len(values),): the band filter's coefficient of each eigenvalue (1 when it is off)."""
        if not self.band_filter:
            return torch.ones_like(values)
        return band_response(values, self.band_coefficients, self.band_edges)[0]

    def last_band(self) -> float:
        return float(self.band_coefficients[-1]) if self.band_filter else 1.0

    def coordination_rest(self) -> float:
        """c on the rest: ε with coordination, 1 without."""
        return float(self.epsilon) if self.coordination else 1.0

    def rate(self, values: Tensor) -> Tensor:
        """e(λ) = 1 + β exp(−λ/σ) (len(values),), 1 when per-eigencomponent rates are off."""
        if not self.eigen_lr:
            return torch.ones_like(values)
        # η_i / η_base = 1 + β exp(−λ_i / σ)
        return 1.0 + self.beta * torch.exp(-values.clamp(min=0) / self.sigma)


@dataclass
class ClassFilter:
    """One class's responses between two refreshes.

    basis (n, m): U_k (the low band, columns 0..k−1), then the extra eigenvectors U_x, those with a gradient
    response of their own first (columns up to ``grad_cols``), then those with only a rate of their own;
    values (m,) their eigenvalues. grad (m,) h_g and rate (m,) e(λ) on the basis; grad_rest, rate_rest on
    its complement (grad equals grad_rest from column ``grad_cols`` on).
    rest_mean: the mean eigenvalue of the complement (NaN: unknown, or no complement). rule: the rest rule
    that applied (``mean`` where ``spectrum`` was asked but only k pairs were known).
    """

    basis: Tensor
    values: Tensor
    k: int
    grad: Tensor
    grad_rest: float
    rate: Tensor
    rate_rest: float
    rest_mean: float
    rule: str
    grad_cols: int

    @property
    def num_extra(self) -> int:
        return self.basis.size(1) - self.k

    def state(self) -> dict:
        return {"basis": self.basis, "values": self.values, "k": self.k, "grad": self.grad,
                "grad_rest": self.grad_rest, "rate": self.rate, "rate_rest": self.rate_rest,
                "rest_mean": self.rest_mean, "rule": self.rule, "grad_cols": self.grad_cols}

    @classmethod
    def from_state(cls, state: dict, device: torch.device) -> ClassFilter:
        moved = {key: v.to(device) if isinstance(v, Tensor) else v for key, v in state.items()}
        return cls(**moved)

    def to(self, device: torch.device) -> ClassFilter:
        return ClassFilter.from_state(self.state(), device)


def rest_mean_eigenvalue(trace: float, values: Tensor, n: int) -> float:
    """λ̄ = (tr L − Σ_{i≤k} λ_i) / (n − k): the mean of the n − k eigenvalues not computed (NaN if none)."""
    k = values.numel()
    if n <= k:
        return math.nan
    return (trace - float(values.double().sum())) / (n - k)


def class_filter(
    values: Tensor,
    vectors: Tensor,
    settings: ResponseSettings,
    rest_values: Tensor | None = None,
    rest_vectors: Tensor | None = None,
    trace: float | None = None,
) -> ClassFilter:
    """The responses of one class (host reads: called once per refresh).

    Args:
        values (k,), vectors (n, k): the low band. rest_values (n − k,), rest_vectors (n, n − k): the other
            eigenpairs when a dense solve found them (``rest: spectrum`` uses them). trace: tr L (``mean``).
    """
    k, n = values.numel(), vectors.size(0)
    rule = settings.rest
    if rule == "spectrum" and rest_values is None:
        rule = "mean"  # only the k smallest are known
    c_rest = settings.coordination_rest()
    if rule == "spectrum":
        if rest_values.numel() != n - k or rest_vectors.shape != (n, n - k):
            raise ValueError(f"rest eigenpairs must be (n - k,) and (n, n - k) with n={n}, k={k}; got "
                             f"{tuple(rest_values.shape)} and {tuple(rest_vectors.shape)}")
        bands = settings.band(torch.cat([values, rest_values]))  # (n,): equal-count bands over the whole spectrum
        g_low, g_rest = bands[:k], c_rest * bands[k:]  # (k,), (n − k,)
        rates = settings.rate(rest_values)  # (n − k,)
        if n > k:
            # the rest's common gradient response: its most frequent value
            uniq, counts = torch.unique(g_rest, return_counts=True)
            grad_rest = float(uniq[torch.argmax(counts)])
            own_grad = g_rest != grad_rest  # (n − k,)
        else:
            grad_rest, own_grad = c_rest * settings.last_band(), torch.zeros(0, dtype=torch.bool)
        outside = own_grad.clone()
        # the rates of what stays in the rest: at its mean eigenvalue, every member within RATE_TOL of it
        while True:
            inside = ~outside
            rest_mean = float(rest_values[inside].double().mean()) if bool(inside.any()) else math.nan
            rate_rest = _at(settings.rate, rest_mean) if bool(inside.any()) else 1.0
            far = inside & ((rates - rate_rest).abs() > RATE_TOL * rate_rest)
            if not bool(far.any()):
                break
            outside = outside | far
        # those with a gradient response of their own first, then those with only a rate of their own
        extra = torch.cat([own_grad.nonzero().view(-1), (outside & ~own_grad).nonzero().view(-1)])  # (m − k,)
        basis = torch.cat([vectors, rest_vectors[:, extra]], dim=1)  # (n, m)
        basis_values = torch.cat([values, rest_values[extra]])  # (m,)
        grad = torch.cat([g_low, g_rest[extra]])  # (m,)
        rate = torch.cat([settings.rate(values), rates[extra]])  # (m,)
        return ClassFilter(basis, basis_values, k, grad, grad_rest, rate, rate_rest, rest_mean, rule,
                           k + int(own_grad.sum()))
    if rule == "mean" and trace is None:
        raise ValueError("the 'mean' rest rule needs tr L (trace)")
    rest_mean = rest_mean_eigenvalue(trace, values, n) if trace is not None else math.nan
    if rule == "last" or math.isnan(rest_mean):
        band_rest, rate_rest = settings.last_band(), 1.0
    else:
        # equal-count bands (no λ edges): the rest lies above every computed eigenvalue, in the last band
        band_rest = settings.last_band() if settings.band_edges is None else _at(settings.band, rest_mean)
        rate_rest = _at(settings.rate, rest_mean)
    return ClassFilter(vectors, values, k, settings.band(values), c_rest * band_rest, settings.rate(values),
                       rate_rest, rest_mean, rule, k)


def _at(response, value: float) -> float:
    """A response at one eigenvalue, as a number."""
    return float(response(torch.tensor([value], dtype=torch.float64))[0])


def carry_coefficients(h_old: Tensor, U_old: Tensor, U_new: Tensor) -> Tensor:
    """Learned coefficients carried from the old low-band eigenvectors to the new ones (a refresh).

    The learned update multiplier is the operator H = U_old diag(h_old) U_oldᵀ + (I − U_old U_oldᵀ) (1 outside
    the old low band); each new eigenvector u_j gets its Rayleigh quotient, with M = U_newᵀ U_old (k, k):

        h_new_j = u_jᵀ H u_j = Σ_i M_ji² h_old_i + (1 − Σ_i M_ji²)

    A reordered or sign-flipped eigenvector (M a signed permutation) keeps its coefficient exactly; a vector
    of a degenerate cluster, any rotation of the cluster, gets the overlap-weighted mean of the cluster's
    coefficients (the subspace is what is determined); a direction new to the low band starts from 1.
    h_old (k_old,), U_old (n, k_old), U_new (n, k) → (k,).
    """
    M = U_new.double().T @ U_old.double()  # (k, k_old)
    W = M.square()  # (k, k_old)
    # h_new = W h_old + (1 − W 1)
    out = W @ h_old.double() + (1.0 - W.sum(1)).clamp(min=0.0)  # (k,)
    return out.to(h_old.dtype)


def align_signs(U_new: Tensor, U_old: Tensor) -> Tensor:
    """U_new with each column's sign chosen so that its largest overlap with an old column is positive: the
    eigenvectors keep their orientation across refreshes (every filter is sign-blind; logs are not).
    U_new (n, k), U_old (n, k_old) → (n, k)."""
    M = U_new.T @ U_old  # (k, k_old)
    best = M.abs().argmax(dim=1, keepdim=True)  # (k, 1)
    sign = torch.sign(M.gather(1, best)).view(-1)  # (k,)
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return U_new * sign  # (n, k)


def update_response(filt: ClassFilter, h_learned: Tensor | None, eigen_lr: bool, learned: bool) -> Tensor | None:
    """h_u (m,) on a class's filter basis: the per-eigencomponent rates e(λ) (ones when ``eigen_lr`` is off)
    times the learned coefficients on the low band (the first k entries, when ``learned`` and there are
    some); h_u,rest on the complement is ``filt.rate_rest``. None when neither part is on."""
    if not (eigen_lr or learned):
        return None
    h = filt.rate.clone() if eigen_lr else torch.ones_like(filt.rate)  # (m,)
    if learned and h_learned is not None:
        h[: filt.k] *= h_learned  # (k,) on the low band
    return h
