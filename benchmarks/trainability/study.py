"""The trainability study (issue 13, item 4): small models trained with one pre-registered recipe
(benchmarks/trainability/RECIPE.md) on two tasks, so that the check's verdict at init can be scored
against what training actually did.

    OMP_NUM_THREADS=1 python benchmarks/trainability/study.py               # every case × seed → outcomes.json
    OMP_NUM_THREADS=1 python benchmarks/trainability/study.py --only tf_    # a subset (kept outcomes are reused)
    OMP_NUM_THREADS=1 python benchmarks/trainability/study.py --list        # the case names

Tasks (the same input for both: one 1×8×8 image per row, 10 classes):
- "digits": scikit-learn's digits, standardised with the training rows' mean and s.d., fixed split
  (train_test_split test_size=0.3, random_state=0: 1257 train, 540 test).
- "motifs" (recipe v2): one of 10 fixed random 4×4 ±1 motifs at one of 9 positions on noise (see
  `_motifs`); 1280 train, 1000 test rows, balanced classes. Recipe v1's second task, "teacher"
  (labels of a random MLP teacher over all 64 inputs, `_teacher`), is kept in the code only to
  reproduce outcomes_v1.json: most CNNs and transformers cannot represent it (RECIPE.md, "Why v2").

The API other scripts use (monitor_study.py, rescore.py): `cases()`, `make_model(case, seed)`,
`make_optimizer(case, model)`, `example_batch(case, seed)`, `train(case, seed, on_step=...)`.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HERE = Path(__file__).resolve().parent
OUTCOMES = HERE / "outcomes.json"
RECIPE_VERSION = "2"

SEEDS = (0, 1, 2)
EPOCHS = 20  # v2: 200 steps on either task (v1: 10 epochs, 100 steps)
BATCH = 128
BAD_FACTOR = 3.0  # a loss above 3× the first step's loss counts as gone bad
DIGITS_THRESHOLD = 0.90  # test accuracy that counts as "trains" on digits
TEACHER_TRAIN_PER_CLASS, TEACHER_TEST_PER_CLASS = 128, 100  # 1280 train, 1000 test rows
TEACHER_FRACTION = 0.85  # "trains" on teacher: ≥ 0.85 × the reference's test accuracy
MOTIF_TRAIN_PER_CLASS, MOTIF_TEST_PER_CLASS = 128, 100  # 1280 train, 1000 test rows
MOTIF_NOISE = 0.35  # s.d. of the background noise; the motif's pixels are ±1
MOTIF_SIZE, MOTIF_OFFSETS = 4, (0, 2, 4)  # a 4×4 motif at row and column offsets 0, 2 or 4: 9 positions
MOTIF_THRESHOLD = 0.79  # "trains" on motifs (v2): 0.85 × the lowest positive control (RECIPE.md), rounded down
EXAMPLE_ROWS = 32  # rows of the training set the check sees
CURVE_POINTS = 50  # samples kept of the loss curve


# -- records ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One architecture + optimizer + learning rate on one task."""

    name: str  # unique: "<architecture>/<optimizer><lr>/<task>"
    family: str  # mlp | cnn | resmlp | resnet | transformer
    task: str  # "digits" | "motifs" (v1: "teacher")
    optimizer: str  # "sgd" | "adam" | "adamw"
    lr: float
    momentum: float  # 0.9 for SGD (the recipe); 0 for Adam(W)
    build: Callable[[], nn.Module] = field(compare=False, repr=False)  # called under torch.manual_seed(seed)

    @property
    def architecture(self) -> str:
        """The name without the task: the same model and optimizer on both tasks."""
        return self.name.rsplit("/", 1)[0]


@dataclass
class Outcome:
    """What training one case with one seed did."""

    case: str
    seed: int
    trained: bool  # finite loss throughout and test metric ≥ the task's threshold
    final_test_metric: float | None  # test accuracy (None: the loss went NaN/Inf)
    threshold: float
    initial_loss: float
    final_loss: float | None
    loss_curve: list[tuple[int, float]]  # (step, loss), sampled
    first_bad_step: int | None  # first step whose loss is NaN/Inf or > 3× the initial loss
    nonfinite_step: int | None  # first step whose loss is NaN/Inf
    steps: int
    seconds: float
    recipe_version: str = RECIPE_VERSION
    torch_version: str = torch.__version__


# -- data -------------------------------------------------------------------------------------------

Split = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@cache
def dataset(task: str) -> Split:
    """(x_train, y_train, x_test, y_test); x of shape (rows, 1, 8, 8), float32; y class indices."""
    if task == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        data = load_digits()
        x = data.data.astype(np.float32)
        x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.3, random_state=0)
        mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # constant border pixels: s.d. 0

        def prepare(a: np.ndarray) -> torch.Tensor:
            return torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)

        return prepare(x_train), torch.tensor(y_train), prepare(x_test), torch.tensor(y_test)
    if task == "motifs":
        return _motifs()
    if task == "teacher":  # recipe v1's second task, kept to reproduce outcomes_v1.json; not a v2 task
        return _teacher()
    raise ValueError(f"unknown task {task!r}")


def _motifs() -> Split:
    """Recipe v2's second task: 10 classes, each a fixed random 3×3 motif of ±1 (seed 1234), drawn at a
    uniformly random position of the 8×8 image (6×6 positions) on N(0, MOTIF_NOISE²) background noise,
    then standardised per pixel with the training rows' mean and s.d. Every family here can represent
    it: an MLP (360 class × position templates), a CNN or ResNet with global pooling (a local detector,
    translation-tolerant), a transformer over rows or patches. 128 per class train, 100 per class test."""
    generator = torch.Generator().manual_seed(1234)
    size, offsets = MOTIF_SIZE, torch.tensor(MOTIF_OFFSETS)
    motifs = torch.randint(0, 2, (10, size, size), generator=generator).float() * 2 - 1
    per_class = MOTIF_TRAIN_PER_CLASS + MOTIF_TEST_PER_CLASS
    y = torch.arange(10).repeat_interleave(per_class)
    x = torch.randn(len(y), 1, 8, 8, generator=generator) * MOTIF_NOISE
    rows, cols = offsets[torch.randint(0, len(offsets), (2, len(y)), generator=generator)]
    for index in range(len(y)):
        r, c = int(rows[index]), int(cols[index])
        x[index, 0, r:r + size, c:c + size] += motifs[y[index]]
    is_train = (torch.arange(len(y)) % per_class) < MOTIF_TRAIN_PER_CLASS
    train_index = is_train.nonzero().squeeze(1)
    train_index = train_index[torch.randperm(len(train_index), generator=generator)]
    test_index = (~is_train).nonzero().squeeze(1)
    x_train, x_test = x[train_index], x[test_index]
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    return (x_train - mean) / std, y[train_index], (x_test - mean) / std, y[test_index]


def _teacher() -> Split:
    """Labels from a fixed random teacher network: logits = W2·tanh(W1·Pᵀx), P a random 16-dim
    subspace of the 64 inputs, W1 16 → 32, W2 32 → 10, logits centred by their per-class median. From
    a pool of 40,000 x ~ N(0, I), each class keeps its quarter of rows with the largest teacher margin
    (top logit − second), and the first 128 of them train, the next 100 test: balanced classes, a
    boundary a small net can learn in the recipe's steps."""
    generator = torch.Generator().manual_seed(1234)
    pool, rank, hidden = 40_000, 16, 32
    x = torch.randn(pool, 64, generator=generator)
    projection = torch.linalg.qr(torch.randn(64, rank, generator=generator))[0]
    w1 = torch.randn(rank, hidden, generator=generator) * (2.0 / rank) ** 0.5
    w2 = torch.randn(hidden, 10, generator=generator) * (1.0 / hidden) ** 0.5
    logits = torch.tanh(x @ projection @ w1) @ w2
    logits = logits - logits.median(0).values
    top = logits.topk(2, 1).values
    margin = top[:, 0] - top[:, 1]
    y = logits.argmax(1)
    train_rows, test_rows = [], []
    for label in range(10):
        rows = (y == label).nonzero().squeeze(1)
        rows = rows[margin[rows] >= margin[rows].quantile(0.75)][:TEACHER_TRAIN_PER_CLASS + TEACHER_TEST_PER_CLASS]
        train_rows.append(rows[:TEACHER_TRAIN_PER_CLASS])
        test_rows.append(rows[TEACHER_TRAIN_PER_CLASS:])
    train_index = torch.cat(train_rows)
    train_index = train_index[torch.randperm(len(train_index), generator=generator)]
    test_index = torch.cat(test_rows)
    x = x.reshape(pool, 1, 8, 8)
    return x[train_index], y[train_index], x[test_index], y[test_index]


@cache
def teacher_threshold() -> float:
    """The pre-registered bar on the teacher task: 0.85 × the test accuracy of a reference that is
    not a case (scikit-learn MLPClassifier(64 hidden, adam, 300 iterations, random_state=0)) on the
    same split."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    x_train, y_train, x_test, y_test = dataset("teacher")
    reference = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference.fit(x_train.reshape(len(x_train), -1).numpy(), y_train.numpy())
    accuracy = float(reference.score(x_test.reshape(len(x_test), -1).numpy(), y_test.numpy()))
    return round(TEACHER_FRACTION * accuracy, 4)


def threshold(task: str) -> float:
    """The pre-registered test accuracy at and above which a run "trains" on `task`."""
    if task == "digits":
        return DIGITS_THRESHOLD
    if task == "motifs":
        return MOTIF_THRESHOLD
    if task == "teacher":
        return teacher_threshold()
    raise ValueError(f"unknown task {task!r}")


# -- models -----------------------------------------------------------------------------------------

def init_linear(layer: nn.Module, init: str, nonlinearity: str = "relu") -> None:
    """he | xavier | normal1 (N(0, 1)) | tiny (N(0, 0.01²)) | default (PyTorch's own); biases zero
    except for default."""
    if init == "default":
        return
    if init == "he":
        nn.init.kaiming_normal_(layer.weight, nonlinearity="relu" if nonlinearity in ("relu", "gelu") else "tanh")
    elif init == "xavier":
        nn.init.xavier_normal_(layer.weight, gain=nn.init.calculate_gain("tanh") if nonlinearity == "tanh" else 1.0)
    elif init == "normal1":
        nn.init.normal_(layer.weight, 0.0, 1.0)
    elif init == "tiny":
        nn.init.normal_(layer.weight, 0.0, 0.01)
    else:
        raise ValueError(init)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def activation(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[name]()


class MLP(nn.Module):
    """Flatten → `depth` × (Linear → [norm] → act) → Linear head (its weights × `head_gain`)."""

    def __init__(self, depth: int, width: int = 64, act: str = "relu", init: str = "he", norm: str = "none",
                 head_gain: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = 64
        for _ in range(depth):
            linear = nn.Linear(fan_in, width)
            init_linear(linear, init, act)
            layers.append(linear)
            if norm == "ln":
                layers.append(nn.LayerNorm(width))
            elif norm == "bn":
                layers.append(nn.BatchNorm1d(width))
            layers.append(activation(act))
            fan_in = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(fan_in, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """`depth` × (3×3 conv → [BN] → ReLU) at 8×8 (a 2×2 max-pool after the first half) → mean pool → head."""

    def __init__(self, depth: int, channels: int = 16, init: str = "he", norm: bool = False,
                 head_gain: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        fan_in = 1
        for index in range(depth):
            conv = nn.Conv2d(fan_in, channels, 3, padding=1, bias=not norm)
            init_linear(conv, init)
            layers += [conv, *([nn.BatchNorm2d(channels)] if norm else []), nn.ReLU()]
            if index == depth // 2 - 1:
                layers.append(nn.MaxPool2d(2))
            fan_in = channels
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


class ResBlock(nn.Module):
    """x + α·f(x), f = Linear → ReLU → Linear (He), with the norm placed per `norm`:
    none | pre (LN before f) | post (LN after the add) | bn (BN inside f, pre-activation style).
    `scale`: the branch's last layer × scale at init (0: zero-init residual); `skipinit`: α a trainable
    scalar starting at 0; `fixup`: last layer zero, first layer × blocks^(-1/2), scalar biases."""

    def __init__(self, width: int, norm: str = "none", scale: float = 1.0, skipinit: bool = False,
                 fixup_blocks: int = 0) -> None:
        super().__init__()
        self.norm = norm
        self.pre = nn.LayerNorm(width) if norm == "pre" else nn.Identity()
        self.post = nn.LayerNorm(width) if norm == "post" else nn.Identity()
        self.mid = nn.BatchNorm1d(width) if norm == "bn" else nn.Identity()
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)
        init_linear(self.fc1, "he")
        init_linear(self.fc2, "he")
        with torch.no_grad():
            self.fc2.weight.mul_(scale)
            if fixup_blocks:
                self.fc1.weight.mul_(fixup_blocks ** -0.5)
                self.fc2.weight.zero_()
        self.alpha = nn.Parameter(torch.zeros(())) if skipinit else None
        self.bias = nn.Parameter(torch.zeros(())) if fixup_blocks else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if self.bias is not None:
            h = h + self.bias
        branch = self.fc2(F.relu(self.mid(self.fc1(h))))
        if self.alpha is not None:
            branch = self.alpha * branch
        return self.post(x + branch)


class ResMLP(nn.Module):
    """Flatten → Linear stem → `blocks` residual blocks → [final LN for pre-LN] → head."""

    def __init__(self, blocks: int, width: int = 64, norm: str = "none", scale: float = 1.0,
                 skipinit: bool = False, fixup: bool = False, head_gain: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(64, width))
        init_linear(self.stem[1], "he")
        self.blocks = nn.Sequential(*[ResBlock(width, norm, scale, skipinit, blocks if fixup else 0)
                                      for _ in range(blocks)])
        self.final = nn.LayerNorm(width) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(width, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_gain)
            if fixup:
                self.head.weight.zero_()
                self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.final(self.blocks(self.stem(x))))


class ConvBlock(nn.Module):
    """x + f(x), f = conv → [BN] → ReLU → conv → [BN] (He; the last BN's γ or conv × `scale`)."""

    def __init__(self, channels: int, norm: bool, scale: float = 1.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not norm)
        init_linear(self.conv1, "he")
        init_linear(self.conv2, "he")
        self.bn1 = nn.BatchNorm2d(channels) if norm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(channels) if norm else nn.Identity()
        with torch.no_grad():
            if norm:
                self.bn2.weight.fill_(scale)
            else:
                self.conv2.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResNet(nn.Module):
    """conv stem (16 channels, 8×8) → `blocks` ConvBlocks → mean pool → head."""

    def __init__(self, blocks: int, channels: int = 16, norm: bool = True, scale: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        init_linear(self.stem, "he")
        self.blocks = nn.Sequential(*[ConvBlock(channels, norm, scale) for _ in range(blocks)])
        self.head = nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(F.relu(self.stem(x))).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Attention and a 4× GELU MLP, each in a residual; LayerNorm placed per `norm`: pre | post | none."""

    def __init__(self, dim: int, heads: int, norm: str) -> None:
        super().__init__()
        self.norm = norm
        self.attn = Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln1 = nn.LayerNorm(dim) if norm != "none" else nn.Identity()
        self.ln2 = nn.LayerNorm(dim) if norm != "none" else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "post":
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.mlp(x))
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """Tokens from the 8×8 image (`tokens`="rows": 8 tokens of 8 pixels; "patches": 4 tokens of 4×4
    pixels) → linear embedding + learned positions → `layers` blocks → [final LN for pre-LN] → mean
    over tokens → head (× `head_gain`)."""

    def __init__(self, layers: int, norm: str = "pre", dim: int = 32, heads: int = 4, tokens: str = "rows",
                 head_gain: float = 1.0) -> None:
        super().__init__()
        self.tokens = tokens
        count, size = (8, 8) if tokens == "rows" else (4, 16)
        self.embed = nn.Linear(size, dim)
        self.pos = nn.Parameter(torch.randn(1, count, dim) * 0.1)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, norm) for _ in range(layers)])
        self.final = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(dim, 10)
        with torch.no_grad():
            self.head.weight.mul_(head_gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.tokens == "rows":
            t = x.reshape(batch, 8, 8)
        else:  # 2×2 grid of 4×4 patches
            t = x.reshape(batch, 2, 4, 2, 4).permute(0, 1, 3, 2, 4).reshape(batch, 4, 16)
        h = self.blocks(self.embed(t) + self.pos)
        return self.head(self.final(h).mean(1))


# -- the case list ----------------------------------------------------------------------------------

#: (architecture name, family, builder, optimizer, lr). Every entry runs on both tasks.
_ARCHITECTURES: list[tuple[str, str, Callable[[], nn.Module], str, float]] = [
    # plain MLPs (width 64): depth, activation, init, learning rate
    ("mlp_relu_d4_he", "mlp", lambda: MLP(4), "sgd", 0.05),
    ("mlp_relu_d8_default", "mlp", lambda: MLP(8, init="default"), "sgd", 0.05),
    ("mlp_relu_d8_xavier", "mlp", lambda: MLP(8, init="xavier"), "sgd", 0.05),
    ("mlp_relu_d8_tiny", "mlp", lambda: MLP(8, init="tiny"), "sgd", 0.05),
    ("mlp_relu_d12_he", "mlp", lambda: MLP(12), "sgd", 0.05),
    ("mlp_relu_d16_he", "mlp", lambda: MLP(16), "sgd", 0.01),
    ("mlp_relu_d16_he", "mlp", lambda: MLP(16), "sgd", 0.05),
    ("mlp_relu_d16_he", "mlp", lambda: MLP(16), "sgd", 0.2),
    ("mlp_relu_d32_he", "mlp", lambda: MLP(32), "sgd", 0.01),
    ("mlp_relu_d48_he", "mlp", lambda: MLP(48), "sgd", 0.01),
    ("mlp_tanh_d16_xavier", "mlp", lambda: MLP(16, act="tanh", init="xavier"), "sgd", 0.05),
    ("mlp_tanh_d8_normal1", "mlp", lambda: MLP(8, act="tanh", init="normal1"), "sgd", 0.05),
    ("mlp_relu_d4_normal1", "mlp", lambda: MLP(4, init="normal1"), "sgd", 0.05),
    ("mlp_gelu_d12_he", "mlp", lambda: MLP(12, act="gelu"), "sgd", 0.05),
    ("mlp_relu_d4_hugehead", "mlp", lambda: MLP(4, head_gain=30.0), "sgd", 0.05),
    ("mlp_relu_d24_ln", "mlp", lambda: MLP(24, norm="ln"), "sgd", 0.05),
    ("mlp_relu_d24_bn", "mlp", lambda: MLP(24, norm="bn"), "sgd", 0.05),
    ("mlp_relu_d12_default", "mlp", lambda: MLP(12, init="default"), "adam", 1e-3),
    ("mlp_relu_d12_default", "mlp", lambda: MLP(12, init="default"), "adam", 1e-2),
    # CNNs on 8×8 (16 channels)
    ("cnn_plain_d4_he", "cnn", lambda: CNN(4), "sgd", 0.05),
    ("cnn_plain_d8_he", "cnn", lambda: CNN(8), "sgd", 0.01),
    ("cnn_plain_d8_he", "cnn", lambda: CNN(8), "sgd", 0.05),
    ("cnn_plain_d12_default", "cnn", lambda: CNN(12, init="default"), "sgd", 0.05),
    ("cnn_bn_d8", "cnn", lambda: CNN(8, norm=True), "sgd", 0.05),
    ("cnn_bn_d8", "cnn", lambda: CNN(8, norm=True), "sgd", 0.2),
    ("cnn_bn_d4_hugehead", "cnn", lambda: CNN(4, norm=True, head_gain=30.0), "sgd", 0.05),
    # residual MLPs (width 64): norm placement, branch scale, SkipInit, Fixup, zero-init
    ("resmlp_he_b8_nonorm", "resmlp", lambda: ResMLP(8), "sgd", 0.05),
    ("resmlp_he_b16_nonorm", "resmlp", lambda: ResMLP(16), "sgd", 0.05),
    ("resmlp_small_branch_b16", "resmlp", lambda: ResMLP(16, scale=0.1), "sgd", 0.05),
    ("resmlp_preln_b16", "resmlp", lambda: ResMLP(16, norm="pre"), "sgd", 0.05),
    ("resmlp_preln_b32", "resmlp", lambda: ResMLP(32, norm="pre"), "sgd", 0.05),
    ("resmlp_postln_b16", "resmlp", lambda: ResMLP(16, norm="post"), "sgd", 0.05),
    ("resmlp_bn_b16", "resmlp", lambda: ResMLP(16, norm="bn"), "sgd", 0.05),
    ("resmlp_skipinit_b16", "resmlp", lambda: ResMLP(16, skipinit=True), "sgd", 0.01),
    ("resmlp_skipinit_b16", "resmlp", lambda: ResMLP(16, skipinit=True), "sgd", 0.05),
    ("resmlp_fixup_b16", "resmlp", lambda: ResMLP(16, fixup=True), "sgd", 0.05),
    ("resmlp_zeroinit_b32", "resmlp", lambda: ResMLP(32, scale=0.0), "sgd", 0.05),
    # convolutional ResNets (16 channels)
    ("resnet_bn_b4", "resnet", lambda: ResNet(4), "sgd", 0.05),
    ("resnet_bn_b4", "resnet", lambda: ResNet(4), "sgd", 0.2),
    ("resnet_nonorm_b4_he", "resnet", lambda: ResNet(4, norm=False), "sgd", 0.05),
    ("resnet_bn_b4_zerogamma", "resnet", lambda: ResNet(4, scale=0.0), "sgd", 0.05),
    # transformers (dim 32, 4 heads; rows or 4×4 patches as tokens)
    ("tf_preln_l2", "transformer", lambda: Transformer(2), "adam", 1e-4),
    ("tf_preln_l2", "transformer", lambda: Transformer(2), "adam", 1e-3),
    ("tf_preln_l2", "transformer", lambda: Transformer(2), "adam", 1e-2),
    ("tf_preln_l2", "transformer", lambda: Transformer(2), "sgd", 0.05),
    ("tf_preln_l6", "transformer", lambda: Transformer(6), "adam", 1e-3),
    ("tf_postln_l6", "transformer", lambda: Transformer(6, norm="post"), "adam", 1e-3),
    ("tf_postln_l6", "transformer", lambda: Transformer(6, norm="post"), "adam", 1e-2),
    ("tf_postln_l12", "transformer", lambda: Transformer(12, norm="post"), "adam", 1e-3),
    ("tf_nonorm_l4", "transformer", lambda: Transformer(4, norm="none"), "adam", 1e-3),
    ("tf_preln_l2_patches", "transformer", lambda: Transformer(2, tokens="patches"), "adamw", 1e-3),
    ("tf_preln_l2_hugehead", "transformer", lambda: Transformer(2, head_gain=30.0), "adam", 1e-3),
]

TASKS = ("digits", "motifs")  # v1: ("digits", "teacher")


def _lr_label(optimizer: str, lr: float) -> str:
    return f"{optimizer}{lr:g}"


@cache
def _cases() -> tuple[Case, ...]:
    out = []
    for task in TASKS:
        for arch, family, build, optimizer, lr in _ARCHITECTURES:
            out.append(Case(name=f"{arch}/{_lr_label(optimizer, lr)}/{task}", family=family, task=task,
                            optimizer=optimizer, lr=lr, momentum=0.9 if optimizer == "sgd" else 0.0, build=build))
    names = [c.name for c in out]
    assert len(names) == len(set(names)), "case names must be unique"
    return tuple(out)


def cases() -> list[Case]:
    """Every case of the study (each architecture × optimizer × lr on both tasks)."""
    return list(_cases())


def case_named(name: str) -> Case:
    for case in _cases():
        if case.name == name:
            return case
    raise KeyError(name)


def make_model(case: Case, seed: int) -> nn.Module:
    """The case's model as it is at init for `seed` (in train mode)."""
    torch.manual_seed(seed)
    return case.build()


def make_optimizer(case: Case, model: nn.Module) -> torch.optim.Optimizer:
    """The recipe's optimizer for the case, built on `model`."""
    if case.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=case.lr, momentum=case.momentum)
    if case.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=case.lr)
    if case.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=case.lr, weight_decay=0.01)
    raise ValueError(case.optimizer)


def example_batch(case: Case, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) the check sees: EXAMPLE_ROWS training rows drawn with `seed`."""
    x_train, y_train, _, _ = dataset(case.task)
    index = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(10_000 + seed))[:EXAMPLE_ROWS]
    return x_train[index].clone(), y_train[index].clone()


# -- training ---------------------------------------------------------------------------------------

OnStep = Callable[[int, nn.Module, torch.optim.Optimizer, torch.Tensor], None]
AfterStep = Callable[[int, nn.Module, torch.optim.Optimizer], None]


def train(case: Case, seed: int, *, on_step: OnStep | None = None, after_step: AfterStep | None = None,
          model: nn.Module | None = None) -> Outcome:
    """Train the case with the recipe and `seed`. Each step: forward, loss, backward, then
    `on_step(step, model, optimizer, loss)` (gradients are in .grad; where a monitor's `step(loss)`
    goes), then `optimizer.step()`, then `after_step(step, model, optimizer)` (where a monitor's
    `after_optimizer_step()` goes). Training stops after the first step whose loss is NaN/Inf (on_step
    still sees that step). `model`: a model from make_model(case, seed) to train instead of a new one."""
    start = time.perf_counter()
    model = make_model(case, seed) if model is None else model
    optimizer = make_optimizer(case, model)
    x_train, y_train, x_test, y_test = dataset(case.task)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x_train) / BATCH)
    total = EPOCHS * steps_per_epoch
    every = max(1, total // CURVE_POINTS)
    curve: list[tuple[int, float]] = []
    initial = final = None
    first_bad = nonfinite = None
    step = 0
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x_train), generator=generator)
        for first in range(0, len(x_train), BATCH):
            index = order[first:first + BATCH]
            loss = F.cross_entropy(model(x_train[index]), y_train[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if on_step is not None:
                on_step(step, model, optimizer, loss)
            value = float(loss.detach())
            if initial is None:
                initial = value
            finite = math.isfinite(value)
            if first_bad is None and (not finite or value > BAD_FACTOR * initial):
                first_bad = step
            if step % every == 0 or not finite:
                curve.append((step, value if finite else float("nan")))
            if not finite:
                nonfinite = step
                break
            final = value
            optimizer.step()
            if after_step is not None:
                after_step(step, model, optimizer)
            step += 1
        if nonfinite is not None:
            break
    metric = None
    if nonfinite is None:
        model.eval()
        with torch.no_grad():
            output = model(x_test)
        if torch.isfinite(output).all():
            metric = float((output.argmax(-1) == y_test).float().mean())
    bar = threshold(case.task)
    return Outcome(case=case.name, seed=seed, trained=metric is not None and metric >= bar,
                   final_test_metric=metric, threshold=bar, initial_loss=float(initial),
                   final_loss=final if nonfinite is None else None, loss_curve=curve,
                   first_bad_step=first_bad, nonfinite_step=nonfinite, steps=step,
                   seconds=round(time.perf_counter() - start, 3))


# -- outcomes file ----------------------------------------------------------------------------------

def load_outcomes(path: Path = OUTCOMES) -> dict[tuple[str, int], dict]:
    """Stored outcomes keyed by (case name, seed)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {(row["case"], int(row["seed"])): row for row in data["outcomes"]}


def save_outcomes(outcomes: dict[tuple[str, int], dict], path: Path = OUTCOMES) -> None:
    """Written to a temporary file and renamed, so a crash never leaves half a file."""
    order = {case.name: index for index, case in enumerate(_cases())}
    rows = sorted(outcomes.values(), key=lambda r: (order.get(r["case"], len(order)), r["case"], r["seed"]))
    head = json.dumps({"recipe_version": RECIPE_VERSION, "torch_version": torch.__version__, "epochs": EPOCHS,
                       "thresholds": {task: threshold(task) for task in TASKS}})[:-1]
    text = head + ', "outcomes": [\n' + ",\n".join(json.dumps(row) for row in rows) + "\n]}\n"  # a row a line
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="*", help="fnmatch pattern on case names (substring if no wildcard)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    parser.add_argument("--redo", action="store_true", help="retrain outcomes already stored")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    parser.add_argument("--out", type=Path, default=OUTCOMES)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pattern = args.only if any(ch in args.only for ch in "*?[") else f"*{args.only}*"
    selected = [c for c in _cases() if fnmatch.fnmatch(c.name, pattern)]
    if args.list:
        print("\n".join(c.name for c in selected))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    outcomes = load_outcomes(args.out)
    bars = ", ".join(f"{task} {threshold(task):.4f}" for task in TASKS)
    print(f"recipe v{RECIPE_VERSION}, {EPOCHS} epochs; thresholds {bars}; {len(selected)} cases × {len(seeds)} seeds",
          flush=True)
    for case in selected:
        for seed in seeds:
            if (case.name, seed) in outcomes and not args.redo:
                continue
            outcome = train(case, seed)
            outcomes[(case.name, seed)] = asdict(outcome)
            save_outcomes(outcomes, args.out)
            metric = "NaN" if outcome.final_test_metric is None else f"{outcome.final_test_metric:.3f}"
            print(f"{case.name:48s} seed {seed} {'trains' if outcome.trained else 'FAILS ':6s} {metric:>6s} "
                  f"bad@{outcome.first_bad_step} init {outcome.initial_loss:.2f} {outcome.seconds:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
