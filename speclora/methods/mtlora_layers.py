"""mtLoRA's layers and math (speclora.methods.mtlora is the method; the module docstring there has the
notation): the experts' SVD and spectral weights, the spectral-orthogonality regulariser, the routed
per-task LoRA (:class:`SpectralTaskLoRA`: model/lora.py's kernel plus the spectral basis) and the two ways it
enters the encoder, on a projection (:class:`LinearWithLoRA`) or beside a whole sublayer (:class:`BlockWithLoRA`).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from speclora.model.lora import MultiTaskLoRA

# sublayer output modules that take (hidden_states, input_tensor) and return LN(dense(h) + input_tensor)
BLOCK_PATTERNS = {
    "attention": re.compile(r"(?:^|\.)(\d+)\.attention\.output$"),
    "ffn": re.compile(r"(?:^|\.)(\d+)\.output$"),
}


# ---------------------------------------------------------------------------------------------- the math
def low_rank_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """SVD of the low-rank products B_k A_k without forming them: B_k A_k = U_k diag(σ_k) V_kᵀ.

    A: (K, r, d_in), B: (K, d_out, r), r <= d_in, d_out
    -> U: (K, d_out, r), σ: (K, r) descending, V: (K, d_in, r).
    """
    # B = Q_B R_B, Aᵀ = Q_A R_A  =>  B A = Q_B (R_B R_Aᵀ) Q_Aᵀ; the SVD of the r×r core gives the rest
    Q_B, R_B = torch.linalg.qr(B)  # (K, d_out, r), (K, r, r)
    Q_A, R_A = torch.linalg.qr(A.transpose(1, 2))  # (K, d_in, r), (K, r, r)
    U_c, sigma, Vh_c = torch.linalg.svd(R_B @ R_A.transpose(1, 2))  # (K, r, r), (K, r), (K, r, r)
    return Q_B @ U_c, sigma, Q_A @ Vh_c.transpose(1, 2)


def spectral_weights(sigma: Tensor, shared_fraction: float) -> Tensor:
    """ω_{k,i} = exp(−σ_{k,i} / σ̄_k) for the low-SV components, 0 for the top ⌈f·r⌉ (shared, left free).

    sigma: (K, r) singular values (any order) -> ω: (K, r); σ̄_k = mean_i σ_{k,i}; f = ``shared_fraction``.
    exp(−σ/σ̄) is the authors' weight (``compute_spectral_regularization`` in utils/hydralora_trainer.py);
    the hard split follows the paper's finding that the top-20% components carry the cross-task alignment
    (89% on Flan-v2→BBH: abstract, Table 1B). f = 0 keeps the soft weight on every component.
    """
    r = sigma.shape[-1]
    mean = sigma.mean(dim=-1, keepdim=True)  # (K, 1) = σ̄_k
    omega = torch.exp(-sigma / (mean + 1e-12))  # (K, r)
    k_free = math.ceil(shared_fraction * r)
    if k_free:
        top = sigma.argsort(dim=-1, descending=True)[..., :k_free]  # (K, k_free)
        omega = omega.scatter(-1, top, 0.0)  # (K, r): the shared components carry no weight
    return omega


def spectral_orthogonality(C: Tensor, omega: Tensor) -> Tensor:
    """Spectral-aware orthogonality of T task updates' components.

        L = 2 / (T (T−1)) · Σ_{t<s} Σ_{i,j} ( ω_{t,i} ω_{s,j} ⟨c_{t,i}, c_{s,j}⟩ )²

    C: (T, d, r), column c_{t,i} = ΔW_t v_{t,i} the i-th component of task t's update (= σ_{t,i} u_{t,i} when
    v is its current right singular vector); omega: (T, r), detached weights (:func:`spectral_weights`).
    L = 0 iff every weighted component of a task is orthogonal to every weighted component of every other
    task; a component with ω = 0 gets no gradient. Returns a 0-d tensor (0 for T < 2).
    """
    T = C.shape[0]
    if T < 2:
        return C.sum() * 0.0
    M = C * omega.unsqueeze(1)  # (T, d, r): ω_{t,i} c_{t,i}
    G = torch.einsum("tdi,sdj->tsij", M, M)  # (T, T, r, r): ω ω ⟨c_{t,i}, c_{s,j}⟩
    energy = G.pow(2).sum(dim=(2, 3))  # (T, T)
    off = 1.0 - torch.eye(T, device=C.device, dtype=C.dtype)  # (T, T): t ≠ s
    return (energy * off).sum() / (T * (T - 1))  # each unordered pair counted twice


# ---------------------------------------------------------------------------------------------- the layers
class SpectralTaskLoRA(MultiTaskLoRA):
    """The multi-task low-rank path Δ of one mtLoRA site (a projection, or a block's residual input): the
    one LoRA kernel of :class:`speclora.model.lora.MultiTaskLoRA` (with its optional routing), plus the
    spectral basis of the last refresh that the regulariser uses, the buffers ``svd_V`` (T, d_in, r),
    ``svd_omega`` (T, r) and ``svd_step`` (). Its state-dict keys are those of mtLoRA's earlier ``TaskLoRA``
    (``lora_A``, ``lora_B``, ``routing``, ``svd_V``, ``svd_omega``, ``svd_step``), so checkpoints load as
    they did. The arguments are :class:`MultiTaskLoRA`'s (``alpha / r`` = the earlier ``scaling``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        T, r, d_in = self.lora_A.shape
        like = dict(dtype=self.lora_A.dtype, device=self.lora_A.device)
        self.register_buffer("svd_V", torch.zeros(T, d_in, r, **like))
        self.register_buffer("svd_omega", torch.zeros(T, r, **like))
        self.register_buffer("svd_step", torch.tensor(-1, dtype=torch.long, device=self.lora_A.device))

    @torch.no_grad()
    def refresh_spectrum(self, shared_fraction: float, step: int) -> None:
        """Store each expert's right singular vectors and weights ω (the basis the regulariser uses)."""
        _, sigma, V = low_rank_svd(self.lora_A.float(), self.lora_B.float())  # (T, r), (T, d_in, r)
        self.svd_V.copy_(V)
        self.svd_omega.copy_(spectral_weights(self.scaling * sigma, shared_fraction))
        self.svd_step.fill_(step)

    def components(self) -> Tensor:
        """(T, d_out, r): c_{k,i} = ΔW_k v_{k,i} for the stored basis, differentiable in A and B."""
        return self.scaling * torch.bmm(self.lora_B, torch.bmm(self.lora_A, self.svd_V))


class LinearWithLoRA(nn.Module):
    """A frozen linear plus its multi-task LoRA: y = W x + b + Δ(x) (component-level adaptation)."""

    def __init__(self, base: nn.Linear, delta: MultiTaskLoRA) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.delta = delta

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(x)  # (N, [L,] d_out)


class BlockWithLoRA(nn.Module):
    """A sublayer's output module LN(dense(h) + x) with the block-level path: LN(dense(h) + x + Δ(x)).

    ``base(hidden_states, input_tensor)`` is e.g. BertSelfOutput (attention block, x = the layer input) or
    BertOutput (FFN block, x = the attention block's output); feeding it x + Δ(x) adds Δ(x) inside the LN.
    """

    def __init__(self, base: nn.Module, delta: MultiTaskLoRA) -> None:
        super().__init__()
        self.base = base
        self.delta = delta

    def forward(self, hidden_states: Tensor, input_tensor: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self.base(hidden_states, input_tensor + self.delta(input_tensor), *args, **kwargs)  # (N, L, H)


def block_sites(encoder: nn.Module, blocks: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(name, layer, block kind) of every sublayer output module that takes (hidden_states, input_tensor)."""
    sites = []
    for name, mod in encoder.named_modules():
        for kind in blocks:
            match = BLOCK_PATTERNS[kind].search(name)
            if match and "input_tensor" in inspect.signature(mod.forward).parameters:
                sites.append((name, int(match.group(1)), kind))
    return sites


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def task_lora_sites(model: nn.Module) -> list[tuple[str, SpectralTaskLoRA]]:
    """(site name, its SpectralTaskLoRA) in model order; the site is the wrapped module's path."""
    named = model.named_modules()
    return [(n.removesuffix(".delta"), m) for n, m in named if isinstance(m, SpectralTaskLoRA)]
