"""What to change in the user's own code for a verified fix: a one-line diff where the join's line
can be rewritten mechanically, a short snippet otherwise."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from healthcheck.graph.joins import Join

_ASSIGN = re.compile(r"^(?P<indent>\s*)(?P<lhs>[\w.\[\]]+)\s*=\s*(?P<rhs>.+?)\s*(?P<comment>#.*)?$")
_AUGMENTED = re.compile(r"^(?P<indent>\s*)(?P<lhs>[\w.\[\]]+)\s*\+=\s*(?P<rhs>.+?)\s*(?P<comment>#.*)?$")
_RETURN = re.compile(r"^(?P<indent>\s*)return\s+(?P<rhs>.+?)\s*(?P<comment>#.*)?$")


def source_line(source: str | None) -> tuple[Path, int, str] | None:
    if not source:
        return None
    path, _, line = source.rpartition(":")
    try:
        lines = Path(path).read_text().splitlines()
        return Path(path), int(line), lines[int(line) - 1]
    except (OSError, ValueError, IndexError):
        return None


def scaled_line(line: str) -> str | None:
    """The line with its sum scaled by 1/√2, or None when it is not a simple sum statement."""
    if m := _AUGMENTED.match(line):
        return f"{m['indent']}{m['lhs']} = ({m['lhs']} + {m['rhs']}) / math.sqrt(2)"
    if m := _RETURN.match(line):
        return f"{m['indent']}return ({m['rhs']}) / math.sqrt(2)"
    if (m := _ASSIGN.match(line)) and "+" in m["rhs"]:
        return f"{m['indent']}{m['lhs']} = ({m['rhs']}) / math.sqrt(2)"
    return None


def suggestion(transform: str, join: Join) -> str:
    """A unified diff (scale_joins on a simple line) or a snippet for the other transforms."""
    found = source_line(join.source)
    if transform == "scale_joins" and found is not None:
        path, number, line = found
        new = scaled_line(line)
        if new is not None:
            diff = difflib.unified_diff([line + "\n"], [new + "\n"], f"a/{path.name}", f"b/{path.name}",
                                        lineterm="\n", n=0)
            text = "".join(diff).replace("@@ -1 +1 @@", f"@@ -{number} +{number} @@")
            return text + "(and `import math` at the top of the file)"
    where = f"at {found[0].name}:{found[1]}: `{found[2].strip()}`" if found else f"in {join.module or 'the root module'}"
    if transform == "zero_init_gains":
        if join.branch_norms:
            norm = join.branch_norms[-1]
            relative = norm[len(join.module) + 1:] if join.module and norm.startswith(join.module + ".") else norm
            return (f"in the block's __init__ ({join.module or 'root'}), zero the last norm of the branch "
                    f"{where}:\n    nn.init.zeros_(self.{relative}.weight)")
        return (f"give the branch a gain that starts at zero, {where}:\n"
                "    self.gain = nn.Parameter(torch.zeros(()))   # __init__\n"
                "    return x + self.gain * f(x)               # forward")
    if transform == "norm_in_branch":
        return (f"normalize the branch before the add, {where}:\n"
                "    self.norm = nn.BatchNorm2d(channels)   # or nn.LayerNorm(features) for sequences\n"
                "    return x + self.norm(f(x))")
    if transform == "scale_branches_by_depth":
        return (f"scale the branch by 1/√(number of blocks), {where}:\n"
                "    return x + f(x) / math.sqrt(num_blocks)")
    if transform == "pre_activation":
        return (f"drop the activation after the add and apply it where the branch starts, {where}:\n"
                "    out = self.conv1(F.relu(x))   # ... the rest of the branch\n"
                "    return out + identity          # instead of relu(out + identity)\n"
                "(full pre-activation also moves the norm: bn → relu → conv in the branch)")
    if transform == "pre_ln" and join.post_norm:
        norm = join.post_norm.rpartition(".")[2]
        return (f"move the norm into the branch (Pre-LN), {where}:\n"
                f"    x = x + f(self.{norm}(x))        # instead of x = self.{norm}(x + f(x))\n"
                "and keep one final norm after the last block")
    return f"scale the sum by 1/√2 {where}: y = (x + f(x)) / math.sqrt(2)"
