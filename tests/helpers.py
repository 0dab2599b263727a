import inspect
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def source_line(obj_or_path, text: str, nth: int = 0) -> str:
    """'file:line' of the nth line containing `text` in a module's source file (read, not assumed)."""
    path = obj_or_path if isinstance(obj_or_path, (str, Path)) else inspect.getsourcefile(obj_or_path)
    lines = Path(path).read_text().splitlines()
    hits = [i + 1 for i, line in enumerate(lines) if text in line]
    assert len(hits) > nth, f"{text!r} not found {nth + 1} times in {path}"
    return f"{path}:{hits[nth]}"


#: source of a residual MLP whose joins have no normalization or scaling and He-initialized branches
#: (HC101 error at depth 12 once the probes measure the growth; a warning from the structure alone),
#: for tests that write it into a user's model file
RESIDUAL_MLP = """import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 32)
        self.fc2 = nn.Linear(32, 32)
        for fc in (self.fc1, self.fc2):  # He init: the branch is as large as the skip, variance grows per block
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))  # JOIN


class Net(nn.Module):
    def __init__(self, depth=12):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.blocks(x))

"""
