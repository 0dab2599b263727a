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
