"""Statistics of one activation tensor, reduced on its device (no host sync)."""

from __future__ import annotations

import torch


def second_moment(x: torch.Tensor) -> torch.Tensor:
    """E[x²] over all elements: the seeds' 'variance' (a batch estimate over random inits)."""
    return x.detach().float().pow(2).mean()


def channel_vectors(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """One row per input and position, one column per channel."""
    x = x.detach().float()
    if x.dim() == 1:
        return x.unsqueeze(1)
    return x.movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])


def rank_size(x: torch.Tensor, channel_dim: int, max_vectors: int) -> int:
    """min(vectors, channels) for `effective_ranks` on this tensor."""
    channels = x.shape[channel_dim] if x.dim() > 1 else 1
    return min(min(x.numel() // max(channels, 1), max_vectors), channels)


def effective_ranks(x: torch.Tensor, channel_dim: int, max_vectors: int,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Labatie's Σλ/λ_max, participation ratio (Σλ)²/Σλ²), both divided by min(vectors, channels).

    λ are the eigenvalues of the covariance of centred channel vectors, taken from the smaller
    Gram matrix; vectors are subsampled to `max_vectors` rows for large feature maps.
    """
    v = channel_vectors(x, channel_dim)
    if v.shape[0] > max_vectors:
        index = torch.randperm(v.shape[0], generator=generator, device="cpu")[:max_vectors].to(v.device)
        v = v.index_select(0, index)
    v = v - v.mean(dim=0, keepdim=True)
    n, c = v.shape
    gram = (v @ v.T if n <= c else v.T @ v).double()
    # NaN/Inf activations (a diverged run) would make eigvalsh fail: decompose a harmless matrix and
    # report NaN, without a host-side check
    finite = torch.isfinite(gram).all()
    gram = torch.where(finite, gram, torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))
    lam = torch.linalg.eigvalsh(gram).clamp(min=0)
    total = lam.sum()
    size = min(n, c)
    tiny = torch.finfo(torch.float64).tiny
    labatie = total / lam.max().clamp(min=tiny) / size
    participation = total.pow(2) / lam.pow(2).sum().clamp(min=tiny) / size
    nan = torch.full_like(labatie, float("nan"))
    return torch.where(finite, labatie, nan).float(), torch.where(finite, participation, nan).float()


def centred_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x − x̄‖ with x̄ the mean over the batch (dim 0)."""
    x = x.detach().float()
    return (x - x.mean(dim=0, keepdim=True)).norm()


def neighbour_correlation(grads: torch.Tensor) -> torch.Tensor:
    """Lag-1 autocorrelation of the gradient field along a line of inputs (Balduzzi et al. 2017).

    Row i is the gradient at the i-th input of the line. Centred over the line, the correlation is
    Σ⟨g̃_i, g̃_{i+1}⟩ / √(Σ‖g̃_i‖² Σ‖g̃_{i+1}‖²): ≈1 for a smoothly varying gradient, ≈0 for white noise.
    """
    raw = grads.detach().double().reshape(grads.shape[0], -1)
    g = raw - raw.mean(dim=0, keepdim=True)
    a, b = g[:-1], g[1:]
    correlation = (a * b).sum() / (a.pow(2).sum() * b.pow(2).sum()).sqrt().clamp(min=1e-300)
    # a gradient that does not change along the line (a linear model) is perfectly smooth
    constant = g.pow(2).sum() <= 1e-20 * raw.pow(2).sum()
    return torch.where(constant, torch.ones_like(correlation), correlation).float()
