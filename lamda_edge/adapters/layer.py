"""`LaMDALinear`: a frozen linear layer with a LaMDA low-dimensional adapter path (docs/method.md).

    x ──> base_layer (frozen, plain or NF4) ─────────────────────────────────────────────┐
    ├──> [frozen_Vt (r x d_in) ──> frozen_U (d_out x r)]   (init "random-residual" only) ──+
    │                                                                                       + ──> y
    └──> dropout ──> A (frozen, r x d_in) ──> S (r x r) ──> * alpha/r ──> B (d_out x r, frozen after t_i)

The optional frozen low-rank term is part of the base: the principal part U_r diag(sigma_r) V_r^T that the
"random-residual" init takes out of the quantized base and keeps exact in float32 (buffers; merged with the base).
A is a buffer, so backward never needs `x` for a weight gradient: autograd keeps only the r-dimensional
activations `A x` (for S's gradient) and `S A x` (for B's, while B trains), plus the dropout mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lamda_edge.adapters.bnb import dequantize_weight, is_linear4bit
from lamda_edge.errors import ModelError


class LaMDALinear(nn.Module):
    """Wraps `base_layer` (an `nn.Linear` or a bitsandbytes `Linear4bit`) with the LaMDA adapter path."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        self.register_buffer("lamda_A", torch.zeros(rank, self.in_features))
        self.lamda_S = nn.Parameter(torch.zeros(rank, rank))
        self.lamda_B = nn.Parameter(torch.zeros(self.out_features, rank))
        # How many of B's leading columns (largest singular values first) are frozen; saved with the adapter.
        self.register_buffer("lamda_B_frozen", torch.zeros((), dtype=torch.long))
        # The frozen low-rank part of the base (init "random-residual"): W_frozen = frozen_U @ frozen_Vt, float32.
        self.register_buffer("frozen_U", None)  # (d_out, r_f) = U_r diag(sigma_r)
        self.register_buffer("frozen_Vt", None)  # (r_f, d_in) = V_r^T
        self._b_frozen_count = 0  # the same count as a Python int: the backward hook reads it without a device sync
        self._frozen_b_values: torch.Tensor | None = None  # (d_out, k) snapshot restored after each step
        self.merged = False
        self.register_module("unmerged_base", None)  # the original base while merged (`merge`), for `unmerge`
        self.lamda_B.register_hook(self._mask_frozen_b_grad)
        self.register_load_state_dict_post_hook(_after_load)
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    # ---- init ----------------------------------------------------------------------------------------------------

    @classmethod
    def from_factors(
        cls, base_layer: nn.Module, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor, alpha: float,
        dropout: float = 0.0, frozen: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> LaMDALinear:
        """The adapted layer around a built (frozen) `base_layer` with factors A (r, d_in), S (r, r), B (d_out, r),
        and the base's frozen low-rank part `frozen` = (U (d_out, r_f), Vt (r_f, d_in)) when the init keeps one.

        The one way every path builds a layer (injection, the 4-bit loader, the prepared-layer cache, the planner's
        measurement). The rank is S's size; the factors are copied in float32 onto the base layer's device.
        """
        layer = cls(base_layer, S.shape[0], alpha, dropout)
        layer.set_factors(A, S, B)
        if frozen is not None:
            layer.set_frozen_part(*frozen)
        return layer

    @torch.no_grad()
    def set_frozen_part(self, U: torch.Tensor, Vt: torch.Tensor) -> None:
        """Keep U (d_out, r_f) @ Vt (r_f, d_in) beside the base as a frozen float32 term (buffers, never trained)."""
        if U.ndim != 2 or Vt.ndim != 2 or U.shape[0] != self.out_features or Vt.shape[1] != self.in_features \
                or U.shape[1] != Vt.shape[0]:
            raise ModelError(f"a frozen low-rank part of shapes {tuple(U.shape)} @ {tuple(Vt.shape)} does not fit a "
                             f"{self.out_features} x {self.in_features} layer")
        device = self.base_layer.weight.device
        self.frozen_U = U.detach().to(device, torch.float32, copy=True)
        self.frozen_Vt = Vt.detach().to(device, torch.float32, copy=True)

    @property
    def frozen_rank(self) -> int:
        """The rank of the base's frozen low-rank part (0 when the init keeps none)."""
        return 0 if self.frozen_U is None else self.frozen_U.shape[1]

    @torch.no_grad()
    def set_factors(self, A: torch.Tensor, S: torch.Tensor, B: torch.Tensor) -> None:
        """Copy A (r, d_in), S (r, r), B (d_out, r) in, as float32 on the base layer's device (the adapter's home)."""
        r = self.rank
        expected = {"A": (r, self.in_features), "S": (r, r), "B": (self.out_features, r)}
        got = {"A": tuple(A.shape), "S": tuple(S.shape), "B": tuple(B.shape)}
        if got != expected:
            raise ModelError(f"LaMDA factors of shapes {got} do not fit a rank-{r} layer {self.out_features} x "
                             f"{self.in_features} (expected {expected})")
        device = self.base_layer.weight.device
        for name, value in (("lamda_A", A), ("lamda_S", S), ("lamda_B", B)):
            getattr(self, name).data = value.detach().to(device, torch.float32, copy=True)
        self.lamda_B_frozen.data = self.lamda_B_frozen.data.to(device)

    # ---- forward -------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # (..., d_out)
        if self.merged:
            return out
        if self.frozen_U is not None:  # the base's frozen low-rank part; x is not saved (buffers only)
            Vt = self.frozen_Vt if self.frozen_Vt.dtype == x.dtype else self.frozen_Vt.to(x.dtype)
            U = self.frozen_U if self.frozen_U.dtype == out.dtype else self.frozen_U.to(out.dtype)
            out = out + F.linear(F.linear(x, Vt).to(out.dtype), U)  # (..., r_f) -> (..., d_out)
        # No full-size copies: the small factors are cast to x's dtype, not the (..., d_in) activations, and the
        # scaling multiplies the r-dimensional u, not a (..., d_out) product.
        A = self.lamda_A if self.lamda_A.dtype == x.dtype else self.lamda_A.to(x.dtype)
        if self.training and self.dropout > 0:
            z = _DropoutProject.apply(x, A, self.dropout)  # (..., r); saves a bool mask only
        else:
            z = F.linear(x, A)  # (..., r): A is a buffer, so `x` is not saved for backward
        u = F.linear(z.to(self.lamda_S.dtype), self.lamda_S) * self.scaling  # (..., r), the middle in float32
        B = self.lamda_B if self.lamda_B.dtype == out.dtype else self.lamda_B.to(out.dtype)
        return out + F.linear(u.to(out.dtype), B)  # (..., d_out)

    # ---- merge ---------------------------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """s * B S A in float32, shape (d_out, d_in)."""
        B, S, A = (t.detach().float() for t in (self.lamda_B, self.lamda_S, self.lamda_A))
        return self.scaling * (B @ S @ A)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight besides the adapter in float32, (d_out, d_in): the base (dequantized for a 4-bit
        base), plus the frozen low-rank part when the init keeps one."""
        weight = dequantize_weight(self.base_layer)
        if self.frozen_U is not None and not self.merged:
            weight = weight + (self.frozen_U @ self.frozen_Vt).to(weight.device)
        return weight

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new frozen `nn.Linear` holding W_base (+ the frozen part) + s * B S A (float32 math, then the base's
        dtype; never NF4)."""
        base = self.base_layer
        dtype = (base.compute_dtype or torch.float32) if is_linear4bit(base) else base.weight.dtype
        device = self.lamda_A.device
        weight = self.base_weight().to(device) + self.delta_weight().to(device)  # (d_out, d_in) float32
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, dtype=dtype,
                           device=device)
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)

    def merge(self) -> None:
        """Fold the adapter into the base (`merged_linear`); the original base is kept for `unmerge`. Idempotent."""
        if self.merged:
            return
        self.unmerged_base = self.base_layer
        self.base_layer = self.merged_linear()
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge`: the original base layer object comes back and the adapter path is active again."""
        if not self.merged:
            return
        self.base_layer = self.unmerged_base
        self.unmerged_base = None
        self.merged = False

    # ---- B freezing ----------------------------------------------------------------------------------------------

    @property
    def frozen_b_columns(self) -> int:
        """How many of B's leading columns are frozen (kept equal to the `lamda_B_frozen` buffer)."""
        return self._b_frozen_count

    def _mask_frozen_b_grad(self, grad: torch.Tensor) -> torch.Tensor:
        k = self._b_frozen_count
        if k == 0:
            return grad
        grad = grad.clone()
        grad[:, :k] = 0  # frozen columns get no gradient (their values are restored after each step too)
        return grad

    @torch.no_grad()
    def restore_frozen_b(self) -> None:
        """Put the frozen columns back to their frozen values (undoes AdamW momentum and weight decay)."""
        if self._frozen_b_values is not None:
            k = self._frozen_b_values.shape[1]
            self.lamda_B[:, :k].copy_(self._frozen_b_values)

    @torch.no_grad()
    def freeze_b_columns(self, k: int) -> bool:
        """Freeze B's first `k` columns at their current values; returns True when B is now wholly frozen."""
        k = max(0, min(int(k), self.rank))
        self.restore_frozen_b()
        if k > self._b_frozen_count or self._frozen_b_values is None:
            self._frozen_b_values = self.lamda_B[:, :k].detach().clone()
            self.lamda_B_frozen.fill_(k)
            self._b_frozen_count = k
        if k == self.rank:
            self.lamda_B.requires_grad_(False)
            self.lamda_B.grad = None
            self._frozen_b_values = None  # requires_grad=False keeps it fixed; no snapshot needed
        return k == self.rank

    def extra_repr(self) -> str:
        quant = "nf4" if is_linear4bit(self.base_layer) else "plain"
        frozen = f", frozen_rank={self.frozen_rank}" if self.frozen_rank else ""
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling:g}, "
                f"base={quant}{frozen}, frozen_b_columns={self.frozen_b_columns}")


class _DropoutProject(torch.autograd.Function):
    """z = dropout(h) @ A^T, keeping only the boolean dropout mask for backward (A is frozen).

    torch's CPU dropout keeps a float mask the size of `h`; a bool mask is a quarter of that.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, A: torch.Tensor, p: float) -> torch.Tensor:
        keep = torch.rand_like(h) >= p  # (..., d_in) bool
        ctx.save_for_backward(keep, A)
        ctx.scale = 1.0 / (1.0 - p)
        ctx.h_dtype = h.dtype
        return F.linear(h * keep * ctx.scale, A)  # (..., r); bf16/fp16 under autocast

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        keep, A = ctx.saved_tensors
        grad_h = (grad_z.to(A.dtype) @ A) * keep * ctx.scale  # (..., d_in)
        return grad_h.to(ctx.h_dtype), None, None


def _after_load(module: LaMDALinear, incompatible_keys) -> None:
    """After loading a state dict, a wholly frozen B stays out of training (so a resumed optimizer matches)."""
    module._b_frozen_count = int(module.lamda_B_frozen)  # one sync per layer, at load time only
    module._frozen_b_values = None
    module.lamda_B.requires_grad_(module.frozen_b_columns < module.rank)
    if 0 < module.frozen_b_columns < module.rank:
        module._frozen_b_values = module.lamda_B[:, : module.frozen_b_columns].detach().clone()
