"""The per-row routing state of a forward, shared by every multi-task LoRA layer of a model
(speclora.model.lora has the layers and the notation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["AdapterRouter"]


class AdapterRouter:
    """Holds the per-row state of the current batch, shared by every LoRA layer of a model.

    ``index: (N,)`` long, row n -> adapter a(n); ``None`` when unset. Layers with a single adapter ignore it.
    ``scales: (S, N, r)``, the rank-wise scale of row n in layer slot k (``None``: no scaling).
    ``weights``: per slot k, generated ``(A: (T, r, d_in), B: (T, d_out, r))`` that replace the layer's own
    parameters (``None``: the layers use their ``lora_A`` / ``lora_B``).
    ``num_slots``: S, the number of LoRA layers sharing this router (set by :func:`inject_lora`).
    """

    def __init__(self, num_adapters: int | None = None, num_slots: int | None = None) -> None:
        self.num_adapters = num_adapters
        self.num_slots = num_slots
        self.index: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.weights: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def set(self, index: torch.Tensor | None, known_ids: Sequence[int] | None = None) -> None:
        """Route row n of the next forward through adapter ``index[n]``.

        ``None`` ends a forward: it clears the index and also any scales or generated weights, so that no
        per-batch state outlives its batch.

        The ids are range-checked here, so that a bad task id fails with a message instead of as a
        device-side assert in a gather. ``known_ids``: the distinct values of ``index`` as the host already
        knows them (the collator's ``present_tasks``); they are checked instead of the tensor, so the
        training step reads nothing back from the device. Without them the check reads ``index.min()/max()``
        (one device sync per forward, not per layer).
        """
        if index is None:
            self.index = None
            self.scales = None
            self.weights = None
            return
        if not isinstance(index, torch.Tensor) or index.dim() != 1:
            shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
            raise ValueError(f"router index: expected a 1-D tensor (N,) of adapter ids, got {shape}")
        if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
            raise ValueError(f"router index: expected an integer tensor, got dtype {index.dtype}")
        if self.num_adapters is not None and index.numel() > 0:
            if known_ids is not None and len(known_ids) > 0:
                lo, hi = min(known_ids), max(known_ids)  # host values: no device read
            else:
                lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.num_adapters:
                raise ValueError(
                    f"router index: adapter ids must lie in [0, {self.num_adapters - 1}], got range [{lo}, {hi}]"
                )
        self.index = index.long()

    def set_scales(self, scales: torch.Tensor | None) -> None:
        """Scale rank component i of row n in layer slot k by ``scales[k, n, i]`` in the next forward.

        scales: (S, N, r) floating, S = ``num_slots``; ``None`` removes the scaling.
        """
        if scales is None:
            self.scales = None
            return
        if not isinstance(scales, torch.Tensor) or scales.dim() != 3 or not scales.dtype.is_floating_point:
            got = (
                (tuple(scales.shape), scales.dtype)
                if isinstance(scales, torch.Tensor)
                else type(scales).__name__
            )
            raise ValueError(f"router scales: expected a floating tensor (S, N, r), got {got}")
        if self.num_slots is not None and scales.shape[0] != self.num_slots:
            raise ValueError(
                f"router scales: expected one entry per LoRA slot, S = {self.num_slots}, got {scales.shape[0]}"
            )
        if self.index is not None and scales.shape[1] != self.index.shape[0]:
            raise ValueError(
                f"router scales: {scales.shape[1]} rows but the routing index has {self.index.shape[0]}"
            )
        self.scales = scales

    def set_weights(self, weights: Sequence[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        """Run the next forward with generated adapters: ``weights[k] = (A: (T, r, d_in), B: (T, d_out, r))``
        for layer slot k, in slot order. Each layer checks its own shapes; ``None`` returns to the parameters."""
        if weights is None:
            self.weights = None
            return
        weights = list(weights)
        if self.num_slots is not None and len(weights) != self.num_slots:
            raise ValueError(
                f"router weights: expected one (A, B) pair per LoRA slot, S = {self.num_slots}, got {len(weights)}"
            )
        self.weights = weights

    def __repr__(self) -> str:
        shape = None if self.index is None else tuple(self.index.shape)
        scales = None if self.scales is None else tuple(self.scales.shape)
        generated = self.weights is not None
        return (
            f"AdapterRouter(num_adapters={self.num_adapters}, num_slots={self.num_slots}, index={shape}, "
            f"scales={scales}, generated_weights={generated})"
        )
