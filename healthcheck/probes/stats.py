"""Statistics of one activation tensor, reduced on its device (no host sync)."""

from __future__ import annotations

import math

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
    """(Labatie's Σλ/λ_max, participation ratio (Σλ)²/Σλ²), both divided by min(vectors, channels)."""
    labatie, participation, *_ = rank_statistics(x, channel_dim, max_vectors, generator)
    return labatie, participation


_POWER_STEPS = 12


def counted_moment(x: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """E[x²] over the positions a loss counts: `counted` (bool, x's leading dimensions) marks them,
    None counts all (`second_moment`)."""
    if counted is None:
        return second_moment(x)
    w = counted.reshape(*counted.shape, *[1] * (x.dim() - counted.dim())).to(torch.float32)
    per_position = x[(0,) * counted.dim()].numel()
    return (x.detach().float().pow(2) * w).sum() / (w.sum() * per_position).clamp(min=1)


def rank_statistics(x: torch.Tensor, channel_dim: int, max_vectors: int,
                    generator: torch.Generator | None = None,
                    counted: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(Labatie's Σλ/λ_max and the participation ratio (Σλ)²/Σλ², both divided by min(vectors,
    channels); the effective number of independent vectors behind λ_max, for `directions_band`; the
    share of the variance within inputs, between their positions).

    λ are the eigenvalues of the covariance of centred channel vectors, taken from the smaller
    Gram matrix; vectors are subsampled to `max_vectors` rows for large feature maps.

    The vectors of one input (its tokens, its pixels) are not independent draws: after attention
    at init the tokens of a sequence are near-copies of its running mean, neighbouring pixels are
    alike. Along the top direction (the one λ_max measures), the share of variance that lies between
    inputs gives the intra-input correlation ρ, and Kish's design effect gives the independent
    draws: n_eff = n / (1 + (p − 1)·ρ) with p vectors per input (n_eff = number of inputs when ρ = 1,
    = n when the positions are independent). Reduced on the device: no host sync.

    `counted` (bool per row of the channel vectors, batch-major as they are) keeps only the positions
    a loss counts (padding out, see `measure.position_weights`); it costs one host copy of the mask.
    """
    v = channel_vectors(x, channel_dim)
    rows = v.shape[0]
    batch = x.shape[0] if x.dim() > 1 and channel_dim % x.dim() != 0 else rows
    per_input = max(rows // max(batch, 1), 1)  # rows of one input: dim 0 stays outermost in `v`
    if counted is not None and counted.numel() == rows:
        kept = counted.reshape(-1).cpu().nonzero().squeeze(1)
        if len(kept) > max_vectors:
            kept = kept[torch.randperm(len(kept), generator=generator, device="cpu")[:max_vectors].sort().values]
        v = v.index_select(0, kept.to(v.device))
        group = (kept // per_input).to(v.device)
        inputs = int(kept[-1]) // per_input + 1
    elif rows > max_vectors:
        index = torch.randperm(rows, generator=generator, device="cpu")[:max_vectors].sort().values
        v = v.index_select(0, index.to(v.device))
        group = (index // per_input).to(v.device)
        inputs = int(index[-1]) // per_input + 1  # a host-side index: no sync
    else:
        group = torch.arange(rows, device=v.device) // per_input
        inputs = (rows - 1) // per_input + 1
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
    labatie = total / lam[-1].clamp(min=tiny) / size
    participation = total.pow(2) / lam.pow(2).sum().clamp(min=tiny) / size
    nan = torch.full_like(labatie, float("nan"))
    # scores of the vectors along the top direction (up to a constant factor, which ρ ignores), by power
    # iteration from the Gram's largest column: matrix-vector products, cheaper than eigh's eigenvectors,
    # and a direction inside a near-degenerate top cluster serves ρ as well as the exact one
    top = gram.gather(1, gram.diagonal().argmax().reshape(1, 1).expand(gram.shape[0], 1)).squeeze(1)
    for _ in range(_POWER_STEPS):
        top = gram @ top
        top = top / top.norm().clamp(min=tiny)
    scores = top if n <= c else v.double() @ top
    draws = torch.tensor(float(n), dtype=torch.float64, device=v.device)
    if 1 < inputs < n:
        counts = torch.zeros(inputs, dtype=torch.float64, device=v.device).index_add_(0, group, torch.ones_like(scores))
        sums = torch.zeros_like(counts).index_add_(0, group, scores)
        means = sums / counts.clamp(min=1)
        between = (counts * (means - scores.mean()).pow(2)).sum() / (scores - scores.mean()).pow(2).sum().clamp(min=tiny)
        # without any correlation the between-input share is (inputs − 1)/(n − 1): that part is chance
        chance = (inputs - 1) / (n - 1)
        rho = ((between - chance) / (1 - chance)).clamp(0, 1)
        draws = n / (1 + (n / inputs - 1) * rho)
    # the share of all variance that lies between the positions of one input (tokens of a sequence,
    # pixels of an image): → 0 when each input's positions collapse onto one vector (Dong et al.'s
    # rank collapse of attention), whatever the number of inputs. NaN with one vector per input.
    within = torch.full_like(labatie, float("nan"))
    if inputs < n:
        counts = torch.zeros(inputs, dtype=v.dtype, device=v.device).index_add_(0, group, torch.ones_like(v[:, 0]))
        means = torch.zeros(inputs, c, dtype=v.dtype, device=v.device).index_add_(0, group, v)
        means = means / counts.clamp(min=1)[:, None]
        within = ((v - means.index_select(0, group)).double().pow(2).sum() / total.clamp(min=tiny))
    return (torch.where(finite, labatie, nan).float(), torch.where(finite, participation, nan).float(),
            torch.where(finite, draws, nan).float(), torch.where(finite, within, nan).float())


def directions_band(directions: float | None, draws: float | None,
                    channels: float | None) -> tuple[float, float] | None:
    """Sampling band (low, high) of the number of directions Σλ/λ_max of the population of inputs,
    from `directions` measured on a sample of `draws` effective independent vectors (`rank_statistics`).

    Σλ (the trace) is estimated well from any sample; λ_max is biased up by sampling noise, so the
    measured Σλ/λ_max is biased low and bounded by the draws: the measurement is the low end. For R
    equal directions seen through m draws, λ_max/mean ≈ (1 + √(R/m))² (Marchenko–Pastur edge, for
    m < R as for m > R), so d = R/(1 + √(R/m))², and inverting it, R = d/(1 − √(d/m))² is the most
    directions a population can have and still show d from m draws: the high end. The isotropic
    null is the one that hides the most directions, so the band is conservative (wide) for a single
    dominant direction. When d ≥ m the sample cannot bound the rank: high is the channel count.
    """
    if directions is None or draws is None or not (math.isfinite(directions) and math.isfinite(draws)):
        return None
    d = max(float(directions), 1.0)  # Σλ/λ_max ≥ 1 whenever there is any variance
    cap = max(float(channels), d) if channels is not None and math.isfinite(channels) else math.inf
    fraction = math.sqrt(d / draws) if draws > 0 else 1.0
    high = cap if fraction >= 1 else min(cap, d / (1 - fraction) ** 2)
    return d, high


def finite_or_none(value: float | None) -> float | None:
    """A host statistic, or None where it is undefined (NaN: e.g. no positions within an input)."""
    return value if value is not None and math.isfinite(value) else None


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
