"""Black-box CLI tests: what a user sees, and exit codes. Bad input: exit 2, one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from healthcheck.cli import main
from tests.helpers import EXAMPLES

TINY = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))
"""


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def write(tmp_path: Path, body: str, name: str = "m.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


def assert_usage_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("healthcheck: error: ")
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_missing_file(tmp_path):
    assert_usage_error(*run(str(tmp_path / "nope.py")), "nope.py: no such file")


def test_file_that_raises_on_import_names_its_line(tmp_path):
    path = write(tmp_path, "import torch\nx = 1\nraise ValueError('boom')\n")
    assert_usage_error(*run(str(path)), "m.py:3", "ValueError: boom")


def test_syntax_error_names_its_line(tmp_path):
    path = write(tmp_path, "import torch\n\ndef f(:\n    pass\n")
    assert_usage_error(*run(str(path)), "m.py:3", "SyntaxError")


def test_no_model_lists_what_was_found(tmp_path):
    path = write(tmp_path, "import torch\nwidth = 3\ndef helper():\n    return 1\n")
    assert_usage_error(*run(str(path)), "no model found", "helper()")


def test_several_models_are_named(tmp_path):
    path = write(tmp_path, TINY + "a = Net()\nb = Net()\nexample_input = torch.randn(2, 3, 8, 8)\n")
    assert_usage_error(*run(str(path)), "several models (a, b)", ":NAME")


def test_several_classes_are_named(tmp_path):
    path = write(tmp_path, TINY + "class Other(Net):\n    pass\n")
    assert_usage_error(*run(str(path)), "Net", "Other")


def test_unknown_name(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\n")
    assert_usage_error(*run(f"{path}:missing"), "no 'missing' in the file", "model (Net instance)")


def test_factory_that_needs_arguments(tmp_path):
    path = write(tmp_path, TINY + "def build_model(width):\n    return Net()\n")
    assert_usage_error(*run(str(path)), "build_model() needs arguments")


def test_missing_input_says_what_first_layer_expects(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\n")
    assert_usage_error(*run(str(path)), "no example input", "--input-shape", "conv (Conv2d) expects shape (N, 3, H, W)")


def test_wrong_input_shape_says_what_first_layer_expects(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\n")
    assert_usage_error(*run(str(path), "--input-shape", "2,5,8,8"), "forward raised", "[2, 5, 8, 8]",
                       "expects shape (N, 3, H, W)")


def test_bad_input_shape_text(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\n")
    assert_usage_error(*run(str(path), "--input-shape", "2,three"), "--input-shape", "integers")


def test_forward_that_raises(tmp_path):
    path = write(tmp_path, """
        import torch
        from torch import nn
        class Broken(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
            def forward(self, x):
                raise RuntimeError("not implemented yet")
        model = Broken()
        example_input = torch.randn(2, 4)
    """)
    assert_usage_error(*run(str(path)), "forward raised RuntimeError", "not implemented yet")


def test_nan_output(tmp_path):
    path = write(tmp_path, """
        import torch
        from torch import nn
        class NaNs(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
            def forward(self, x):
                return self.fc(x) * float("nan")
        model = NaNs()
        example_input = torch.randn(2, 4)
    """)
    assert_usage_error(*run(str(path)), "NaN or Inf")


def test_unavailable_device(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\nexample_input = torch.randn(2, 3, 8, 8)\n")
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    assert_usage_error(*run(str(path), "--device", "cuda"), "CUDA is not available")


def test_debug_shows_traceback(tmp_path):
    path = write(tmp_path, "raise ValueError('boom')\n")
    code, out, err = run(str(path), "--debug")
    assert code == 2 and "Traceback" in err and "ValueError: boom" in err


def test_user_file_is_not_changed(tmp_path):
    path = write(tmp_path, TINY + "model = Net()\n")
    before = path.read_bytes()
    run(str(path))
    run(str(path), "--input-shape", "2,3,8,8")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["m.py"]


def test_example_input_variants(tmp_path):
    for value in ("torch.randn(2, 3, 8, 8)", "(torch.randn(2, 3, 8, 8),)", "lambda: torch.randn(2, 3, 8, 8)",
                  "{'x': torch.randn(2, 3, 8, 8)}"):
        path = write(tmp_path, TINY + f"model = Net()\nexample_inputs = {value}\n")
        code, out, err = run(str(path))
        assert code == 0, (value, err)


def test_name_selects_factory_and_class(tmp_path):
    path = write(tmp_path, TINY + "def make():\n    return Net()\nexample_input = torch.randn(2, 3, 8, 8)\n")
    assert run(f"{path}:make")[0] == 0
    assert run(f"{path}:Net")[0] == 0
    assert run(str(path))[0] == 0  # the only nn.Module class


def test_token_input_shape_draws_token_ids(tmp_path):
    code, out, err = run(str(EXAMPLES / "postln_transformer.py"), "--input-shape", "2,16")
    assert code == 0, err


def test_sick_example_fails_with_findings_and_fixes():
    code, out, err = run(str(EXAMPLES / "deep_resnet_no_norm.py"))
    assert code == 1
    assert "HC101" in out and "HC201" in out and "error" in out and "fix:" in out and "1/√2" in out
    assert "deep_resnet_no_norm.py:21" in out


def test_fail_on_levels():
    target = str(EXAMPLES / "postln_transformer.py")  # warnings only
    assert run(target)[0] == 0
    assert run(target, "--fail-on", "warning")[0] == 1
    assert run(str(EXAMPLES / "deep_resnet_no_norm.py"), "--fail-on", "never")[0] == 0


def test_select_and_ignore():
    target = str(EXAMPLES / "deep_resnet_no_norm.py")
    assert run(target)[0] == 1
    assert run(target, "--ignore", "HC")[0] == 0
    assert run(target, "--select", "HC1", "--ignore", "HC101")[0] == 0  # HC101 is its only structural error
    assert run(target, "--select", "HC102")[0] == 0
    assert run(target, "--select", "HC1", "--ignore", "HC10")[0] == 0
    assert run(target, "--select", "HC201")[0] == 1  # the measured variance explosion


def test_json_output(tmp_path):
    code, out, err = run(str(EXAMPLES / "deep_resnet_no_norm.py"), "--format", "json")
    data = json.loads(out)
    assert code == 1 and data["schema"] == "healthcheck/1" and data["summary"]["error"] >= 1
    assert {f["code"] for f in data["findings"] if f["severity"] == "error"} >= {"HC101", "HC201"}
    assert len(data["measurements"]["profile"]) == 16
    assert len(data["architecture"]["joins"]) == 16
    target = tmp_path / "r.json"
    assert run(str(EXAMPLES / "preact_resnet.py"), "--format", "json", "-o", str(target))[0] == 0
    assert json.loads(target.read_text())["model"]["trace"] == "fx"


def test_verbose_says_why_tracers_failed(tmp_path):
    path = write(tmp_path, """
        import torch
        from torch import nn
        class Gated(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
            def forward(self, x):
                if x.sum() > 0:
                    return x + self.fc(torch.relu(self.fc(x)))
                return x
        model = Gated()
        example_input = torch.ones(2, 4)
    """)
    code, out, err = run(str(path), "-v")
    assert code == 0, err
    assert "traced with hooks" in out and "fx tracing failed" in out and "export tracing failed" in out


def test_rule_command_and_list():
    code, out, _ = run("rule", "HC101")
    assert code == 0 and "Why is this bad?" in out and "1/√2" in out
    code, out, _ = run("rules")
    assert code == 0 and all(c in out for c in ("HC101", "HC102", "HC103", "HC104", "HC105"))
    assert run("rule", "HC999")[0] == 2


def test_console_script_and_module_entry_points():
    """The installed `healthcheck` script and `python -m healthcheck` both work end to end."""
    proc = subprocess.run([sys.executable, "-m", "healthcheck", str(EXAMPLES / "deep_resnet_no_norm.py"),
                           "--no-color"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "HC101" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "healthcheck", "nope.py"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip() == "healthcheck: error: nope.py: no such file"


def test_fix_shows_before_after_and_code_change(tmp_path, monkeypatch):
    code, out, err = run(str(EXAMPLES / "deep_resnet_no_norm.py"), "--fix", "--export", str(tmp_path / "fixed.pt"))
    assert code == 1, err  # the findings of the original model still decide the exit code
    assert "Fixes applied to a copy and measured again" in out
    assert "scale_joins" in out and "norm_in_branch" in out and "zero_init_gains" in out
    assert "+        return (x + self.conv2(F.relu(self.conv1(F.relu(x))))) / math.sqrt(2)" in out
    import torch

    # loaded as a user would, in a process where the model file is importable (its classes are
    # pickled as deep_resnet_no_norm.Block, not under the check's private module name)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    fixed = torch.load(tmp_path / "fixed.pt", weights_only=False)
    assert fixed(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    code, out, err = run(str(EXAMPLES / "deep_resnet_no_norm.py"), "--fix", "--format", "json")
    data = json.loads(out)
    assert {f["transform"] for f in data["fixes"]} == {"scale_joins", "scale_branches_by_depth", "norm_in_branch",
                                                      "zero_init_gains"}
    hc201 = next(f for f in data["findings"] if f["code"] == "HC201")
    assert hc201["fix"]["verified"]["verified"] is True
    assert hc201["fix"]["verified"]["after"]["var_ratio_per_block"] < 1.3 < hc201["fix"]["verified"]["before"]["var_ratio_per_block"]
    assert_usage_error(*run(str(EXAMPLES / "deep_resnet_no_norm.py"), "--export", "x.pt"), "--export", "--fix")
