"""Hand-written models with known structure, shared by the tests."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def he_linear(width_in: int, width_out: int) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
    nn.init.zeros_(layer.bias)
    return layer


class ScaledBlock(nn.Module):
    """x + f(x), scaled by 1/sqrt(2): variance-preserving residual without normalization."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = he_linear(width, width), he_linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.fc2(F.relu(self.fc1(F.relu(x))))) * (1 / math.sqrt(2))


class ScaledResNet(nn.Module):
    def __init__(self, width: int = 32, blocks: int = 8) -> None:
        super().__init__()
        self.inp = he_linear(16, width)
        self.blocks = nn.Sequential(*[ScaledBlock(width) for _ in range(blocks)])
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.blocks(self.inp(x)))


class Attention(nn.Module):
    """Hand-written multi-head self-attention (so fx traces into it)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        y = att.softmax(dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class PreLNBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PostLNBlock(PreLNBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, block: type[nn.Module], layers: int = 4, dim: int = 32, heads: int = 4, vocab: int = 100,
                 context: int = 64) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, context, dim))
        self.blocks = nn.Sequential(*[block(dim, heads) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim) if block is PreLNBlock else nn.Identity()
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos[:, : tokens.shape[1]]  # a positional sum, not a join
        return self.head(self.norm(self.blocks(x)))


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class UNet(nn.Module):
    """Two-level U-Net: encoder features are concatenated onto the upsampled decoder path."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2 = conv_bn_relu(3, c), conv_bn_relu(c, 2 * c)
        self.mid = conv_bn_relu(2 * c, 4 * c)
        self.up2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2)
        self.dec2 = conv_bn_relu(4 * c, 2 * c)
        self.up1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec1 = conv_bn_relu(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([e2, self.up2(m)], dim=1))
        d1 = self.dec1(torch.cat([e1, self.up1(d2)], dim=1))
        return self.out(d1)


class GatedResNet(nn.Module):
    """Data-dependent control flow (a Python `if` on tensor values): fx and export cannot follow it."""

    def __init__(self, width: int = 32, blocks: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(16, width)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(blocks))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for branch in self.branches:
            if x.abs().mean() > 1e-6:  # data-dependent
                x = x + branch(x)
        return self.out(x)


class PlainStack(nn.Module):
    def __init__(self, depth: int = 24, width: int = 32, norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [he_linear(width, width)] + ([nn.BatchNorm1d(width)] if norm else []) + [nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ReLUEndBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = he_linear(width, width), he_linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.fc2(F.relu(self.fc1(self.norm(x)))))


class LoraLinear(nn.Module):
    """peft-style LoRA: W·x + s·B·A·x is one linear map, not a residual join."""

    def __init__(self, base: nn.Linear, rank: int = 4) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(x)) * self.scaling


class ParallelBlock(nn.Module):
    """PaLM / Cohere parallel block written residual-first: x + attn(ln(x)) + mlp(ln(x))."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.attn = Attention(dim, 4)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        return x + self.attn(h) + self.mlp(h)


class InplaceBlock(nn.Module):
    """Mutation without rebinding: out.add_(x); F.relu_(out)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(F.relu(self.norm(self.fc1(x))))
        out.add_(x)
        F.relu_(out)
        return out


class BiasEndBlock(nn.Module):
    """The branch ends by adding a bias parameter: a shift, not a learnable gain."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.w2 = nn.Parameter(torch.randn(width, width) / width**0.5)
        self.b2 = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (F.relu(self.fc1(self.norm(x))) @ self.w2 + self.b2)


class SumStyles(nn.Module):
    """Joins written three ways: sum([f(x), x]) (Python adds 0 first), x + (f(x) + 1.0), torch.add(alpha=)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = sum([self.branches[0](x), x])
        x = x + (self.branches[1](x) + 1.0)
        return torch.add(x, self.branches[2](x), alpha=0.1)


def dropout_add(x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A helper that makes the join, as in HF BLOOM/Falcon."""
    return residual + F.dropout(x, p=0.0)


class HelperJoinBlock(PreLNBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = dropout_add(self.attn(self.ln1(x)), x)
        return dropout_add(self.mlp(self.ln2(x)), x)
