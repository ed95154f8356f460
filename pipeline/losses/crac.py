"""Class and Region-Adaptive Constraints (CRaC, Murugesan et al., arXiv 2403.12364), 2D and 3D.

Each voxel is a *boundary* voxel (its window holds more than one label, :func:`~pipeline.losses.neighbours.
boundary_mask`) or an *interior* one. On the raw logits ``l`` and the neighbourhood class proportions ``τ``
(:func:`~pipeline.losses.neighbours.class_proportions`) the constraint is ``h = |τ − l|`` on boundary voxels and
``h = |m·τ − l|`` on interior ones. Each (region, class) has its own multiplier ``λ`` and penalty parameter ``ρ``
(``2K`` of each, boundary columns first). With the PHR penalty ``P(h; λ, ρ) = ((λ + ρh)₊² − λ²) / (2ρ)``, the loss is
``CE + mean P`` over ``B·spatial·2K`` (each voxel's ``h`` in the columns of its region, 0 — which costs 0 — in the
other region's), as in the released code (``Bala93/CRac``, ``calibrate/lagrangian/aug_lagrangian_spatial_cls_bndry
.py``, ``penalty.py``).

Once per epoch (:meth:`ClassRegionConstraints.end_epoch`, called by the trainer) the multipliers become the mean over
voxels of ``clamp(P'(h), λ_min, λ_max)`` per column, and every ``rho_step`` epochs a column's ``ρ`` grows by ``gamma``
(within ``[rho, rho_max]``) when its mean constraint has not fallen below ``tao`` × its value of the epoch before.
The released code gathers these statistics in a no-gradient pass over the validation data after each epoch; here
they are gathered, without gradient, from the epoch's own training batches (the constraint values the loss has
just computed), so that the update needs no pass of its own, happens every epoch whatever ``val_interval``, and
every process of a multi-process run contributes: the sums are all-reduced before the update, so every process
holds the same multipliers. The multipliers are the loss's state (buffers): they go into ``checkpoints/last.pt``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.collectives import sum_across
from pipeline.losses.base import SegmentationLoss, check_number
from pipeline.losses.neighbours import BOUNDARY_TESTS, boundary_mask, class_proportions

LAMBDA_MIN, LAMBDA_MAX = 1e-6, 1e6


def phr(h: torch.Tensor, lambd: torch.Tensor, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The PHR penalty ``((λ + ρh)₊² − λ²) / (2ρ)`` and its derivative ``(λ + ρh)₊`` in ``h``."""
    x = lambd + rho * h
    sup = x >= 0
    value = torch.where(sup, (x.square() - lambd.square()) / (2 * rho), -lambd.square() / (2 * rho))
    return value, torch.where(sup, x, torch.zeros_like(x))


class ClassRegionConstraints(SegmentationLoss):
    """CRaC: ``CE + mean PHR(h; λ, ρ)`` with per-(region, class) multipliers updated once per epoch (module docstring).

    ``parts``: ``ce``, ``penalty`` (the mean PHR term) and ``constraint`` (the mean ``h``). :meth:`end_epoch`
    returns the multipliers and penalty parameters for the epoch's log (``crac/lambda_b<k>``, ``crac/lambda_i<k>``,
    ``crac/rho_b<k>``, ``crac/rho_i<k>``: boundary and interior, class ``k``).

    Args:
        num_classes: ``K`` (the config passes the dataset's; ``None``: taken from the first logits).
        margin: ``m`` on interior voxels (default 5 and ``rho`` 0.1: the released README's training commands; its
            config file has 1 and 1).
        rho: the initial and smallest penalty parameter.
        rho_max: the largest (default 10).
        rho_step: grow ``ρ`` every ``rho_step`` epochs (default 10; 0: never).
        gamma: the growth factor (default 1.2).
        tao: a constraint counts as progressing when it falls below ``tao`` × its previous value (default 0.9).
        kernel_size: odd window width (default 3).
        boundary_test: ``"exact"`` (default) or ``"released"`` (:func:`~pipeline.losses.neighbours.boundary_mask`).
    """

    def __init__(self, num_classes: int | None = None, margin: float = 5.0, rho: float = 0.1, rho_max: float = 10.0,
                 rho_step: int = 10, gamma: float = 1.2, tao: float = 0.9, kernel_size: int = 3,
                 boundary_test: str = "exact") -> None:
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 2):
            raise ValueError(f"num_classes must be a whole number >= 2, got {num_classes!r}")
        if isinstance(rho_step, bool) or not isinstance(rho_step, int) or rho_step < 0:
            raise ValueError(f"rho_step must be a whole number >= 0, got {rho_step!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
        if boundary_test not in BOUNDARY_TESTS:
            raise ValueError(f"boundary_test must be one of {', '.join(BOUNDARY_TESTS)}, got {boundary_test!r}")
        self.rho_step, self.kernel_size = rho_step, kernel_size
        self.boundary_test = boundary_test
        self.margin = check_number("margin", margin, low=0)
        self.rho_min = check_number("rho", rho, low=0, low_open=True)
        self.rho_max = check_number("rho_max", rho_max, low=self.rho_min)
        self.gamma = check_number("gamma", gamma, low=1)
        self.tao = check_number("tao", tao, low=0)
        self._init_state(num_classes or 0)

    def _init_state(self, num_classes: int) -> None:
        self.num_classes = num_classes
        columns = 2 * num_classes
        # training state, saved with the checkpoint (float64: the same numbers on every device)
        device = self.lambd.device if hasattr(self, "lambd") else None
        self.register_buffer("lambd", torch.full((columns,), LAMBDA_MIN, dtype=torch.float64, device=device))
        self.register_buffer("rho", torch.full((columns,), self.rho_min, dtype=torch.float64, device=device))
        self.register_buffer("previous", torch.zeros(columns, dtype=torch.float64, device=device))
        self.register_buffer("has_previous", torch.zeros((), dtype=torch.bool, device=device))
        # the epoch's sums (reset by end_epoch, so always zero in a checkpoint written after it)
        self.register_buffer("grad_sum", torch.zeros(columns, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("h_sum", torch.zeros(columns, dtype=torch.float64, device=device), persistent=False)
        self.register_buffer("voxels", torch.zeros((), dtype=torch.float64, device=device), persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "lambd")
        if saved is not None and self.num_classes == 0 and saved.numel() > 0:  # built without num_classes
            self._init_state(saved.numel() // 2)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def constraints(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``h`` per column, ``B×2K×spatial``: the boundary columns hold ``h`` on boundary voxels and 0 elsewhere,
        the interior columns the reverse."""
        if self.num_classes == 0:
            self._init_state(logits.shape[1])
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"CRaC was built for {self.num_classes} classes (num_classes), the logits have "
                             f"{logits.shape[1]}")
        with torch.no_grad():
            tau = class_proportions(labels, self.num_classes, self.kernel_size, logits.dtype)
            boundary = boundary_mask(labels, self.kernel_size, self.boundary_test)[:, None].to(logits.dtype)
        h = boundary * (tau - logits).abs() + (1 - boundary) * (self.margin * tau - logits).abs()
        return torch.cat([h * boundary, h * (1 - boundary)], dim=1)

    def _broadcast(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.to(like.dtype).reshape(1, -1, *[1] * (like.ndim - 2))

    def _forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, labels)
        h = self.constraints(logits, labels)
        lambd, rho = self._broadcast(self.lambd, h), self._broadcast(self.rho, h)
        value, grad = phr(h, lambd, rho)
        penalty = value.mean()
        with torch.no_grad():
            if self.training:
                dims = [0, *range(2, h.ndim)]
                self.grad_sum += grad.clamp(LAMBDA_MIN, LAMBDA_MAX).sum(dims).double()
                self.h_sum += h.sum(dims).double()
                self.voxels += h.numel() // h.shape[1]
        n_voxel = h.numel() // h.shape[1]
        constraint = h.detach().sum() / (n_voxel * self.num_classes)  # mean h per (voxel, class)
        self.parts = {"ce": ce.detach(), "penalty": penalty.detach(), "constraint": constraint}
        return ce + penalty

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Update the multipliers after (1-based) ``epoch`` from the epoch's sums, all-reduced over processes, and
        reset the sums. Every process must call it. Returns the values for the epoch's log (none after an epoch
        without training batches)."""
        sums = sum_across(torch.cat([self.grad_sum, self.h_sum, self.voxels[None]]))
        self.grad_sum.zero_(), self.h_sum.zero_(), self.voxels.zero_()
        columns = 2 * self.num_classes
        voxels = float(sums[-1])
        if voxels > 0:
            self.lambd.copy_((sums[:columns] / voxels).clamp(LAMBDA_MIN, LAMBDA_MAX))
            current = sums[columns : 2 * columns] / voxels
            if self.rho_step > 0:
                if epoch % self.rho_step == 0 and bool(self.has_previous):
                    stalled = current > self.previous.clamp(min=0) * self.tao
                    self.rho.copy_(torch.where(stalled, self.gamma * self.rho, self.rho).clamp(self.rho_min,
                                                                                              self.rho_max))
                self.previous.copy_(current)
                self.has_previous.fill_(True)
        k = self.num_classes
        out = {}
        for name, t in (("lambda", self.lambd), ("rho", self.rho)):
            out.update({f"crac/{name}_b{c}": float(t[c]) for c in range(k)})
            out.update({f"crac/{name}_i{c}": float(t[k + c]) for c in range(k)})
        return out
