"""Spectral initialization of a LaMDA adapter from a full-precision weight (docs/method.md).

    W0 = U diag(sigma) V^T                       (float32, singular values descending)
    principal:  A = V_r^T,  B = U_r,  S = diag(sigma_r) / s,  W_base = W0 - U_r diag(sigma_r) V_r^T
    minor:      the bottom-r components instead; the residual keeps the principal part
    random:     A, B random orthonormal, S = 0, W_base = W0
    random-residual:  A, B random orthonormal, S = 0, W_base = W0 - U_r diag(sigma_r) V_r^T, and the principal
                part kept beside the base as a frozen low-rank term P = (U_r diag(sigma_r)) V_r^T

so that at step 0, W_base (+ P) + s * B S A == W0 up to float error. `random-residual` trains what `random`
trains (the same A and B for the same seed) while a 4-bit base quantizes only the residual, as `principal` does.
The random factors of each layer are drawn from the run's seed and the layer's name (`layer_seed`): every layer
reads and writes its own random subspace, as PEFT's per-layer random init does.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import torch

# Under svd="auto" a randomized SVD is used when rank + oversampling is at most a quarter of the smaller side:
# then it costs a few thin matmuls instead of a full SVD (measured here: 0.13 s -> 0.01 s for 576 x 576, one thread),
# and the residual stays exact because it is taken against the same factors.
RANDOMIZED_SVD_OVERSAMPLE = 16
RANDOMIZED_SVD_POWER_ITERS = 4
RANDOMIZED_SVD_MAX_FRACTION = 0.25


@dataclass
class SpectralInit:
    """The adapter's initial factors and the residual base weight, all float32."""

    A: torch.Tensor  # (r, d_in)
    S: torch.Tensor  # (r, r)
    B: torch.Tensor  # (d_out, r)
    residual: torch.Tensor  # (d_out, d_in)
    svd_seconds: float
    svd_error: float | None  # ||W - U_r diag(sigma_r) V_r^T|| / ||W|| when a randomized SVD was used, else None
    frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # random-residual: (U_r diag(sigma_r) (d_out, r),
    #                                                            V_r^T (r, d_in)), the frozen principal part


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """All singular values of `weight` (d_out, d_in) in float32, descending."""
    return torch.linalg.svdvals(weight.detach().float())


def energy_score(sigma: torch.Tensor, base_rank: int) -> float:
    """LaMDA++ normalized energy: sum(sigma_1..r0 ^ 2) / sum(sigma ^ 2), in (0, 1]."""
    energy = sigma.double().pow(2)
    total = energy.sum()
    return float(energy[:base_rank].sum() / total) if total > 0 else 1.0


def _use_randomized(weight: torch.Tensor, rank: int, method: str) -> bool:
    if method == "full":
        return False
    if method == "randomized":
        return True
    return rank + RANDOMIZED_SVD_OVERSAMPLE <= RANDOMIZED_SVD_MAX_FRACTION * min(weight.shape)


def randomized_svd(weight: torch.Tensor, rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD by random projection with power iterations (Halko et al. 2011), seeded and deterministic.

    Unlike `torch.svd_lowrank` it draws from its own generator, so the global RNG (and a resumed run) is untouched.
    Returns (U_r (d_out, r), sigma_r (r,), V_r (d_in, r)).
    """
    d_out, d_in = weight.shape
    q = min(rank + RANDOMIZED_SVD_OVERSAMPLE, d_out, d_in)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d_in, q, generator=generator).to(weight.device)  # (d_in, q)
    Q, _ = torch.linalg.qr(weight @ omega)  # (d_out, q): a basis of W's range
    for _ in range(RANDOMIZED_SVD_POWER_ITERS):
        Z, _ = torch.linalg.qr(weight.T @ Q)  # (d_in, q)
        Q, _ = torch.linalg.qr(weight @ Z)  # (d_out, q)
    U_small, sigma, Vh = torch.linalg.svd(Q.T @ weight, full_matrices=False)  # (q, q), (q,), (q, d_in)
    return (Q @ U_small)[:, :rank], sigma[:rank], Vh[:rank].T


def _top_svd(
    weight: torch.Tensor, rank: int, randomized: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_r (d_out, r), sigma_r (r,), V_r (d_in, r)) of the top-r components."""
    if randomized:
        return randomized_svd(weight, rank, seed)
    U, sigma, Vh = torch.linalg.svd(weight, full_matrices=False)
    return U[:, :rank], sigma[:rank], Vh[:rank].T


def _random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float32))
    return q  # (rows, cols), orthonormal columns


def layer_seed(seed: int, name: str) -> int:
    """The seed of one layer's random factors: the run's `seed` and the layer's module name, so that no two layers
    share A and B. (One seed for every layer gave all the layers of a shape the same A and B: all 30 q_proj of
    SmolLM2 read the same 16 input directions. Measured in docs/benchmarks.md section 4.)"""
    return (seed * 0x9E3779B97F4A7C15 + zlib.crc32(name.encode())) % 2**63


def _random_factors(d_out: int, d_in: int, rank: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, d_in), B (d_out, r)): random orthonormal rows and columns, drawn on the CPU from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    B = _random_orthonormal(d_out, rank, generator).to(device)
    A = _random_orthonormal(d_in, rank, generator).T.contiguous().to(device)
    return A, B


def spectral_init(
    weight: torch.Tensor, rank: int, init: str, scaling: float, svd: str = "auto", seed: int = 0, name: str = ""
) -> SpectralInit:
    """Factor `weight` (d_out, d_in) into a LaMDA init of rank `rank` (see the module docstring).

    `seed` seeds the randomized SVD; the random factors come from `layer_seed(seed, name)`, `name` being the layer's
    module name.

    The SVD runs in float32 on the weight's device; the results are float32 on that device.
    """
    W = weight.detach().float()
    d_out, d_in = W.shape
    start = time.perf_counter()
    svd_error = None
    if init == "random":
        A, B = _random_factors(d_out, d_in, rank, layer_seed(seed, name), W.device)
        S = torch.zeros(rank, rank, device=W.device)
        return SpectralInit(A, S, B, W.clone(), time.perf_counter() - start, None)
    if init in ("principal", "random-residual"):
        randomized = _use_randomized(W, rank, svd)
        U, sigma, V = _top_svd(W, rank, randomized, seed)
        if randomized:
            # Reported so a user can judge the randomized factors: ||W - U_r diag(sigma_r) V_r^T|| / ||W||.
            svd_error = float((W - (U * sigma) @ V.T).norm() / W.norm().clamp_min(1e-30))
    else:  # minor: bottom-r components, kept in descending order within the chosen ones
        U_all, sigma_all, Vh_all = torch.linalg.svd(W, full_matrices=False)
        U, sigma, V = U_all[:, -rank:], sigma_all[-rank:], Vh_all[-rank:].T
    part = (U * sigma) @ V.T  # (d_out, d_in) = U_r diag(sigma_r) V_r^T
    if init == "random-residual":
        A, B = _random_factors(d_out, d_in, rank, layer_seed(seed, name), W.device)
        S = torch.zeros(rank, rank, device=W.device)
        frozen = ((U * sigma).contiguous(), V.T.contiguous())  # (d_out, r), (r, d_in)
        return SpectralInit(A, S, B, W - part, time.perf_counter() - start, svd_error, frozen)
    A = V.T.contiguous()  # (r, d_in)
    B = U.contiguous()  # (d_out, r)
    S = torch.diag(sigma) / scaling  # (r, r)
    return SpectralInit(A, S, B, W - part, time.perf_counter() - start, svd_error)
