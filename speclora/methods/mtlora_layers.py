"""mtLoRA's layers and math (speclora.methods.mtlora is the method; the module docstring there has the
notation): the experts' SVD and spectral weights, the spectral-orthogonality regulariser, the routed
per-task LoRA (:class:`TaskLoRA`) and the two ways it enters the encoder, on a projection
(:class:`LinearWithLoRA`) or beside a whole sublayer (:class:`BlockWithLoRA`).
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch
from torch import Tensor, nn

from speclora.model.lora import AdapterRouter

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
class TaskLoRA(nn.Module):
    """The multi-task low-rank path Δ of one site (a projection, or a block's residual input).

    Row n of task t = router.index[n]:
        routing off: Δ(x_n) = s B_t A_t dropout(x_n)
        routing on:  Δ(x_n) = Σ_k w_{t,k} ⊙ (s B_k A_k dropout(x_n)) = s B̃_t Â dropout(x_n),
                     Â = [A_1; ...; A_K]: (K r, d_in),
                     B̃_t = [diag(w_{t,1}) B_1, ..., diag(w_{t,K}) B_K]: (d_out, K r)

    Shapes: x: (N, L, d_in) or (N, d_in) -> (N, L, d_out) or (N, d_out); lora_A: (K, r, d_in),
    lora_B: (K, d_out, r), routing: (T, K, d_out / g). One expert and no routing needs no router index.
    The buffers ``svd_V`` (K, d_in, r) and ``svd_omega`` (K, r) hold the spectral basis of the last refresh.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_experts: int,
        r: int,
        scaling: float,
        dropout: float,
        router: AdapterRouter | None,
        init_A: Tensor,
        routing: bool = False,
        group_size: int = 1,
    ) -> None:
        super().__init__()
        if d_out % group_size:
            raise ValueError(
                f"model.method.init_args.routing_group_size={group_size} does not divide the output width "
                f"{d_out}"
            )
        self.d_in, self.d_out, self.r, self.scaling, self.group_size = (
            d_in,
            d_out,
            r,
            float(scaling),
            group_size,
        )
        self.router = router
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(
            init_A.reshape(1, r, d_in).repeat(num_experts, 1, 1).clone()
        )  # (K, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, dtype=init_A.dtype))  # (K, d_out, r)
        if routing:
            eye = torch.eye(num_experts, dtype=init_A.dtype)  # (T, K): identity routing
            self.routing = nn.Parameter(eye.unsqueeze(-1).repeat(1, 1, d_out // group_size))  # (T, K, G)
        else:
            self.register_parameter("routing", None)
        self.register_buffer("svd_V", torch.zeros(num_experts, d_in, r, dtype=init_A.dtype))
        self.register_buffer("svd_omega", torch.zeros(num_experts, r, dtype=init_A.dtype))
        self.register_buffer("svd_step", torch.tensor(-1, dtype=torch.long))

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def mixed_B(self) -> Tensor:
        """(T, d_out, K r) = B̃_t for every task t (routing on)."""
        w = self.routing.repeat_interleave(self.group_size, dim=-1)  # (T, K, d_out)
        mixed = w.unsqueeze(-1) * self.lora_B.unsqueeze(0)  # (T, K, d_out, r) = diag(w_{t,k}) B_k
        return mixed.permute(0, 2, 1, 3).reshape(w.shape[0], self.d_out, -1)  # (T, d_out, K r)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(x).to(self.lora_A.dtype)  # (N, [L,] d_in)
        if self.num_experts == 1 and self.routing is None:
            z = h @ self.lora_A[0].transpose(0, 1) @ self.lora_B[0].transpose(0, 1)  # (N, [L,] d_out) = B A x
            return (self.scaling * z).to(x.dtype)
        index = None if self.router is None else self.router.index
        if index is None:
            raise RuntimeError(
                "TaskLoRA: the router's index is unset; call router.set(task_of_each_row) first"
            )
        n = x.shape[0]
        if index.shape[0] != n:
            raise ValueError(
                f"router index has {index.shape[0]} rows but the input has {n} (x: {tuple(x.shape)})"
            )
        index = index.to(x.device)
        h = h.reshape(n, -1, self.d_in)  # (N, L, d_in)
        if self.routing is None:
            z = torch.bmm(h, self.lora_A[index].transpose(1, 2))  # (N, L, r) = A_t x
            z = torch.bmm(z, self.lora_B[index].transpose(1, 2))  # (N, L, d_out) = B_t A_t x
        else:
            z = h @ self.lora_A.reshape(-1, self.d_in).transpose(0, 1)  # (N, L, K r) = Â x
            z = torch.bmm(z, self.mixed_B()[index].transpose(1, 2))  # (N, L, d_out) = B̃_t Â x
        out_shape = (*x.shape[:-1], self.d_out)
        return (self.scaling * z).reshape(out_shape).to(x.dtype)  # (N, [L,] d_out)

    def effective(self, t: int) -> tuple[Tensor, Tensor]:
        """Task t's adapter as one LoRA with s folded in: A: (R, d_in), B: (d_out, R), Δ(x) = B A x."""
        if self.routing is None:
            return self.lora_A[t], self.scaling * self.lora_B[t]  # R = r
        return self.lora_A.reshape(-1, self.d_in), self.scaling * self.mixed_B()[t]  # R = K r

    # -------------------------------------------------------------- spectral regulariser
    @torch.no_grad()
    def refresh_spectrum(self, shared_fraction: float, step: int) -> None:
        """Store each expert's right singular vectors and weights ω (the basis the regulariser uses)."""
        _, sigma, V = low_rank_svd(self.lora_A.float(), self.lora_B.float())  # (K, r), (K, d_in, r)
        self.svd_V.copy_(V)
        self.svd_omega.copy_(spectral_weights(self.scaling * sigma, shared_fraction))
        self.svd_step.fill_(step)

    def components(self) -> Tensor:
        """(K, d_out, r): c_{k,i} = ΔW_k v_{k,i} for the stored basis, differentiable in A and B."""
        return self.scaling * torch.bmm(self.lora_B, torch.bmm(self.lora_A, self.svd_V))


class LinearWithLoRA(nn.Module):
    """A frozen linear plus its multi-task LoRA: y = W x + b + Δ(x) (component-level adaptation)."""

    def __init__(self, base: nn.Linear, delta: TaskLoRA) -> None:
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

    def __init__(self, base: nn.Module, delta: TaskLoRA) -> None:
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


def task_lora_sites(model: nn.Module) -> list[tuple[str, TaskLoRA]]:
    """(site name, its TaskLoRA) in model order; the site is the wrapped module's path."""
    return [(n.removesuffix(".delta"), m) for n, m in model.named_modules() if isinstance(m, TaskLoRA)]
