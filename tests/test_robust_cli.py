"""The CLI under bad input, hostile model files and interruptions: one line on stderr and exit code 2
(130 for Ctrl-C), never a traceback, a hang, a silent pass or a lost report.

Each class of issue 14's "CLI and configuration" list has its own section; the cases are our own.
Most run in-process (CliRunner, the analysis forks a child) on tiny models with --no-probes; the
few that need real file descriptors or signals run `python -m healthcheck`.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from torch import nn

import healthcheck
from healthcheck import check
from healthcheck.suppression import schema_problem
from tests.helpers import ROOT
from tests.test_cli import assert_usage_error, run

#: a 3-block residual MLP: quick to check, with joins for the structural rules
SMALL = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
    def forward(self, x):
        return x + self.fc(torch.tanh(x))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(3)])
    def forward(self, x):
        return self.blocks(x)
"""

SCHEMA = json.loads((Path(healthcheck.__file__).parent / "report" / "report.schema.json").read_text())


def model_file(directory: Path, extra: str = "", name: str = "net.py", forward_extra: str = "") -> Path:
    """SMALL plus `extra` at module level (after the model) and `forward_extra` at the start of Net.forward."""
    source = SMALL
    if forward_extra:
        indented = textwrap.indent(textwrap.dedent(forward_extra).strip(), " " * 8)
        source = source.replace("        return self.blocks(x)", indented + "\n        return self.blocks(x)")
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source + "\nmodel = Net()\nexample_input = torch.randn(8, 6)\n" + textwrap.dedent(extra))
    return path


def cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m healthcheck ...` in a real process (real file descriptors, real signals)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "healthcheck", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


# --- 1. output destinations: checked before the analysis; a late failure keeps the report -----------------------

MARKER_AT_IMPORT = """
import pathlib
pathlib.Path(__file__).with_suffix(".imported").touch()
"""


@pytest.mark.parametrize("flag, destination, needle", [
    ("-o", "missing_dir/report.json", "does not exist"),
    ("-o", "a_file.txt/report.json", "is not a directory"),
    ("-o", "out_dir", "directory"),
    ("--tensorboard", "a_file.txt", "is a file"),
    ("--tensorboard", "a_file.txt/runs", "is a file"),
])
def test_bad_destination_fails_before_the_model_runs(tmp_path, flag, destination, needle):
    path = model_file(tmp_path, MARKER_AT_IMPORT)
    (tmp_path / "a_file.txt").write_text("x")
    (tmp_path / "out_dir").mkdir()
    assert_usage_error(*run(str(path), "--no-probes", flag, str(tmp_path / destination)), needle)
    assert not path.with_suffix(".imported").exists()  # the model file was never imported


def test_bad_export_destination_fails_before_the_model_runs(tmp_path):
    path = model_file(tmp_path, MARKER_AT_IMPORT)
    assert_usage_error(*run(str(path), "--fix", "--export", str(tmp_path / "nowhere" / "fixed.pt")),
                       "--export", "does not exist")
    assert not path.with_suffix(".imported").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert_usage_error(*run(str(model_file(tmp_path)), "--no-probes", "-o", str(locked / "r.json")),
                           "not writable")
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (a file whose writes fail)")
def test_write_that_fails_late_keeps_the_report(tmp_path):
    """A file on /dev/full passes every check and then fails (no space): the other output is written, this
    one's report goes to stdout, and the error is one line with exit code 2."""
    full, other = tmp_path / "full.json", tmp_path / "report.md"
    full.symlink_to("/dev/full")
    code, out, err = run(str(model_file(tmp_path)), "--no-probes", "-o", str(full), "-o", str(other))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"healthcheck: error: -o {full}") and "printed" in lines[0]
    assert "Net" in other.read_text()
    assert json.loads(out)["model"]["name"] == "Net"  # the report that could not be written, not lost


def test_tensorboard_write_that_fails_late_keeps_the_report(tmp_path):
    """With several files each model gets DIR/NAME; a file already named Net there makes that write fail
    after the analysis: one line, exit code 2, and both reports still on stdout."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "Net").write_text("in the way")
    code, out, err = run(str(model_file(tmp_path, name="a.py")), str(model_file(tmp_path, name="b.py")),
                         "--no-probes", "--format", "json", "--tensorboard", str(runs))
    assert code == 2 and [r["model"]["name"] for r in json.loads(out)] == ["Net", "Net"]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("--tensorboard" in line and "could not write" in line for line in lines)


# --- 2. --baseline: checked against the report schema ------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_report(tmp_path_factory) -> dict:
    directory = tmp_path_factory.mktemp("baseline")
    target = directory / "baseline.json"
    code, _, err = run(str(model_file(directory)), "--no-probes", "--format", "json", "-o", str(target))
    assert code in (0, 1), err
    return json.loads(target.read_text())


def _mutations(report: dict) -> list[tuple[str, object, str]]:
    """(what, baseline content, a word the error names) for baselines that are not healthcheck/1 reports."""
    def changed(edit) -> dict:
        data = copy.deepcopy(report)
        edit(data)
        return data

    finding = {"code": "HC101", "severity": "warning", "message": "m", "location": {"module": "a", "source": None},
               "evidence": {}, "fix": None}
    return [
        ("other schema", changed(lambda d: d.update(schema="sarif/2.1.0")), "not a healthcheck JSON report"),
        ("future version", changed(lambda d: d.update(schema="healthcheck/7")), "newer healthcheck"),
        ("missing findings", changed(lambda d: d.pop("findings")), "findings"),
        ("missing model name", changed(lambda d: d["model"].pop("name")), "name"),
        ("model not an object", changed(lambda d: d.update(model=["Net"])), "model"),
        ("summary count a string", changed(lambda d: d["summary"].update(error="two")), "summary.error"),
        ("unknown severity", changed(lambda d: d.update(findings=[{**finding, "severity": "fatal"}])),
         "findings[0].severity"),
        ("bad code", changed(lambda d: d.update(findings=[{**finding, "code": "HC1O1"}])), "findings[0].code"),
        ("finding without location", changed(lambda d: d.update(findings=[
            {k: v for k, v in finding.items() if k != "location"}])), "location"),
        ("suppressed without reason", changed(lambda d: d.update(suppressed=[finding])), "reason"),
        ("a number", 42, "not a healthcheck JSON report"),
        ("a list holding a string", [report, "x"], "report [1]"),
    ]


def test_bad_baselines_are_one_line_usage_errors(tmp_path, saved_report):
    path = model_file(tmp_path)
    baseline = tmp_path / "baseline.json"
    for _what, content, needle in _mutations(saved_report):
        baseline.write_text(json.dumps(content))
        code, out, err = run(str(path), "--no-probes", "--baseline", str(baseline))
        assert_usage_error(code, out, err, "--baseline", needle)
    for _what, raw, needle in [("not UTF-8", b'{"schema": "healthcheck/1", "x": "\xff\xfe"}', "UTF-8"),
                              ("nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, "nested"),
                              ("truncated", json.dumps(saved_report).encode()[:-20], "not JSON")]:
        baseline.write_bytes(raw)
        assert_usage_error(*run(str(path), "--no-probes", "--baseline", str(baseline)), needle)


def test_schema_check_agrees_with_jsonschema(saved_report):
    """The hand-written validator (jsonschema is a test dependency only) accepts what jsonschema accepts and
    rejects what it rejects, on a real report and on each broken one."""
    assert schema_problem(saved_report, SCHEMA) is None
    jsonschema.validate(saved_report, SCHEMA)
    for what, content, _ in _mutations(saved_report):
        if not isinstance(content, dict) or content.get("schema") != "healthcheck/1":
            continue  # the version check comes first in load_baseline
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(content, SCHEMA)
        assert schema_problem(content, SCHEMA) is not None, what


# --- 3. --select / --ignore: unknown codes are usage errors, everywhere -----------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (("--select", "HC1O1"), "HC1O1 (did you mean HC101?)"),
    (("--select", "HC999"), "HC999"),
    (("--select", ""), "--select is empty"),
    (("--select", " , "), "--select is empty"),
    (("--ignore", "HC2,HX3"), "HX3"),
    (("--select", "HC4"), "training"),  # runs only in HealthMonitor: the check would run nothing
    (("--select", "HC2,HC3"), "--no-probes"),  # measured rules, with the measurements skipped
])
def test_selection_that_checks_nothing_is_a_usage_error(tmp_path, flags, needle):
    assert_usage_error(*run(str(model_file(tmp_path)), "--no-probes", *flags), needle)


def test_prefixes_stay_valid(tmp_path):
    path = model_file(tmp_path)
    for flags in (("--select", "HC"), ("--select", "hc1"), ("--select", "HC10", "--ignore", "HC2")):
        code, _, err = run(str(path), "--no-probes", *flags)
        assert code in (0, 1) and not err.strip(), (flags, err)


@pytest.mark.parametrize("body, needle", [
    ("select = []", "select is empty"),
    ('select = ["HC1", "hc9"]', "HC9"),
    ('ignore = ["HC10I"]', "HC10I"),
])
def test_unknown_codes_in_the_config(tmp_path, body, needle):
    (tmp_path / "pyproject.toml").write_text("[tool.healthcheck]\n" + body + "\n")
    assert_usage_error(*run(str(model_file(tmp_path)), "--no-probes"), "pyproject.toml", needle)


def test_api_takes_a_string_of_codes_as_one_list_and_rejects_unknown_ones():
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(8, 4)
    assert check(model, x, probes=False, select="HC101").rules == ("HC101",)  # not "H", "C", "1", ...
    assert check(model, x, probes=False, select="HC101,hc104").rules == ("HC101", "HC104")
    for bad, needle in [(dict(select="HC1O1"), "HC1O1"), (dict(select=["HC101", "HC777"]), "HC777"),
                        (dict(ignore="XY"), "XY"), (dict(select=""), "empty"), (dict(fail_on="fatal"), "fatal"),
                        (dict(select=5), "list of rule codes"), (dict(seed=-1), "seed")]:
        with pytest.raises(ValueError, match=needle):
            check(model, x, probes=False, **bad)


# --- 4. [tool.healthcheck] values of the wrong type name the file and the key -----------------------------------

@pytest.mark.parametrize("body, key", [
    ('seed = "abc"', "seed"),
    ("seed = true", "seed"),
    ("seed = 1.5", "seed"),
    ("input-shape = 5", "input-shape"),
    ('input-shape = [[8, 6], "x"]', "input-shape"),
    ("input-shape = [8, -6]", "input-shape"),
    ('rules = "x"', "rules"),
    ("rules = { HC101 = 3 }", "rules.HC101"),
    ('trace = "bogus"', "trace"),
    ("trace = 1", "trace"),
    ('fail-on = "fatal"', "fail-on"),
    ("fail-on = false", "fail-on"),
    ("select = \"HC1\"", "select"),
    ("models = 5", "models"),
    ("[tool.healthcheck.rules.HC101]\nwarn-joins = -2", "warn-joins"),
    ("[tool.healthcheck.rules.HC101]\nerror-joins = \"many\"", "error-joins"),
    ("[tool.healthcheck.rules.HC101]\nerror-joins = 2.5", "error-joins"),
    ("[tool.healthcheck.rules.HC201]\nwarn-ratio = nan", "warn-ratio"),
    ("[tool.healthcheck.rules.HC201]\nwarn-ratio = true", "warn-ratio"),
    ('[tool.healthcheck.models."*.py"]\nseed = "x"', "seed"),
])
def test_wrong_config_values_name_file_and_key(tmp_path, body, key):
    (tmp_path / "pyproject.toml").write_text("[tool.healthcheck]\n" + body + "\n")
    assert_usage_error(*run(str(model_file(tmp_path)), "--no-probes"), "pyproject.toml", key)


@pytest.mark.parametrize("content, needle", [
    ('[tool]\nhealthcheck = "hello"\n', "healthcheck must be a table"),
    ("tool = 3\n", "`tool` must be a table"),
    ("[tool.healthcheck\n", "not valid TOML"),
    (b"[tool.healthcheck]\nseed = 1 # \xff\n", "UTF-8"),
])
def test_malformed_pyproject(tmp_path, content, needle):
    path = tmp_path / "pyproject.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_usage_error(*run(str(model_file(tmp_path)), "--no-probes"), "pyproject.toml", needle)


def test_valid_config_values_still_work(tmp_path):
    (tmp_path / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.healthcheck]
        seed = 3
        input-shape = [4, 6]
        trace = "hooks"
        fail-on = "never"
        [tool.healthcheck.rules.HC101]
        warn-joins = 1
        error-joins = 2
        [tool.healthcheck.rules.HC201]
        warn-ratio = 3
    """))
    code, out, err = run(str(model_file(tmp_path)), "--no-probes", "--format", "json")
    data = json.loads(out)
    assert code == 0 and not err.strip() and data["model"]["trace"] == "hooks"
    assert data["model"]["input_shapes"][0][1] == 6


# --- 5. user text is never read as rich markup -------------------------------------------------------------------

def test_markup_in_paths_is_printed_as_text(tmp_path):
    odd = model_file(tmp_path / "run[/bold]", name="m[red]x.py")
    plain = model_file(tmp_path)
    code, out, err = run(str(odd), str(plain), "--no-probes")
    assert code in (0, 1), err
    assert f"checking {odd} …" in err  # the progress line, literally
    assert out.count("Net ·") == 2
    assert_usage_error(*run(str(tmp_path / "[/red]nope[bold].py")), "[/red]nope[bold].py: no such file")


# --- 6. the model's own output never reaches stdout --------------------------------------------------------------

NOISY = """
import os, sys, warnings
print("PRINTED AT IMPORT")
"""
GATED = """
if x.sum() > 0:  # data-dependent: fx and export fail (export logs guards and graph dumps), hooks trace it
    x = x * 1.0
"""

NOISY_FORWARD = """
print("PRINTED IN FORWARD", x.shape)
sys.stdout.write("WRITTEN TO STDOUT\\n")
os.write(1, b"C-LEVEL WRITE TO FD 1\\n")
warnings.warn("the model warns\\nwith a second line")
"""


def test_model_prints_go_to_stderr_and_machine_formats_stay_clean(tmp_path):
    """Prints at import and in forward (Python and C level) go to stderr; torch's own logs and graph dumps
    (the data-dependent branch makes torch.export fail loudly) are not shown; one line per user warning."""
    path = model_file(tmp_path, NOISY, forward_extra=NOISY_FORWARD + GATED)
    proc = cli(str(path), "--format", "json")
    assert proc.returncode in (0, 1), proc.stderr
    assert json.loads(proc.stdout)["model"]["trace"] == "hooks"  # only the report: it parses
    ours = ("PRINTED AT IMPORT", "PRINTED IN FORWARD", "WRITTEN TO STDOUT", "C-LEVEL WRITE TO FD 1")
    for text in ours:
        assert text in proc.stderr
    foreign = [line for line in proc.stderr.splitlines()
               if line.strip() and not any(t in line for t in (*ours, "healthcheck: warning:"))]
    assert foreign == []  # no torch log lines, graph dumps or tracebacks
    warnings_shown = [line for line in proc.stderr.splitlines() if line.startswith("healthcheck: warning:")]
    assert len(warnings_shown) == 1 and "UserWarning: the model warns" in warnings_shown[0]
    # in-process too (Python-level writes), for each machine format
    for fmt in ("sarif", "junit", "markdown"):
        code, out, err = run(str(path), "--no-probes", "--format", fmt)
        assert code in (0, 1) and "PRINTED" not in out and "WRITTEN" not in out, fmt


# --- 7. hangs and exits in the model's code ----------------------------------------------------------------------

@pytest.mark.parametrize("extra, forward_extra", [
    ("import time\ntime.sleep(120)\n", ""),  # hangs at import
    ("import time\n", "time.sleep(120)"),  # hangs in forward
])
def test_hang_times_out_with_one_line(tmp_path, extra, forward_extra):
    path = model_file(tmp_path, extra, forward_extra=forward_extra)
    start = time.monotonic()
    assert_usage_error(*run(str(path), "--no-probes", "--timeout", "2"), "timed out after 2 s", "--timeout")
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("extra, forward_extra, needle", [
    ("import os\nos._exit(0)\n", "", "exit code 0"),
    ("import os\n", "os._exit(0)", "exit code 0"),
    ("import os\n", "os._exit(3)", "exit code 3"),
    ("import sys\n", "sys.exit(0)", "sys.exit(0)"),
    ("import os, signal\n", "os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
])
def test_exit_or_crash_in_the_model_is_an_error_not_a_pass(tmp_path, extra, forward_extra, needle):
    path = model_file(tmp_path, extra, forward_extra=forward_extra)
    assert_usage_error(*run(str(path), "--no-probes"), needle)


def test_other_files_are_still_checked_after_a_hang_or_exit(tmp_path):
    hung = model_file(tmp_path, "import time\ntime.sleep(120)\n", name="hung.py")
    exits = model_file(tmp_path, "import os\nos._exit(0)\n", name="exits.py")
    good = model_file(tmp_path, name="good.py")
    code, out, err = run(str(hung), str(exits), str(good), "--no-probes", "--timeout", "2", "--format", "json")
    assert code == 2
    assert json.loads(out)["model"]["name"] == "Net"  # the good file's report
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "hung.py" in lines[0] and "timed out" in lines[0] and "exits.py" in lines[1]


# --- 8. torch's noise stays out of stderr; Ctrl-C is 130 ---------------------------------------------------------

def test_torch_logs_and_multiline_errors_are_one_line_unless_verbose(tmp_path):
    path = model_file(tmp_path, forward_extra=GATED)
    code, out, err = run(str(path), "--no-probes", "--format", "json", "-v")
    assert code in (0, 1) and "torch" in err  # what torch printed (hidden by default) is there with -v
    assert json.loads(out)["model"]["trace"] == "hooks"
    broken = model_file(tmp_path, name="broken.py", forward_extra="raise RuntimeError('first line\\n  frame #0\\n"
                                                                   "  frame #1')")
    assert_usage_error(*run(str(broken), "--no-probes"), "first line")
    code, _, err = run(str(broken), "--no-probes", "-v")
    assert code == 2 and "frame #1" in err and "Traceback" not in err


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    started = tmp_path / "started"
    path = model_file(tmp_path, f"import pathlib, time\npathlib.Path({str(started)!r}).touch()\ntime.sleep(120)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # the CLI's own exit is what is tested: its output goes to a file, so a process that outlives it
    # holding a pipe cannot hold up the wait (that would be listed in the failure message)
    errors = tmp_path / "stderr.txt"
    with errors.open("w") as stderr:
        # as from a terminal: a test run started in the background of a script (`pytest &`, CI runners)
        # passes SIGINT down ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        proc = subprocess.Popen([sys.executable, "-m", "healthcheck", str(path), "--no-probes"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 180
        while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert started.exists(), errors.read_text() if proc.poll() is not None else "model never imported"
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no exit 60 s after SIGINT; processes: {_process_tree(proc.pid)}; "
                                 f"stderr: {errors.read_text()[-2000:]}") from None
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert [line for line in errors.read_text().splitlines() if line.strip()] == ["healthcheck: interrupted"]


def _process_tree(pid: int) -> str:
    """`pid` and its children with their state and what they wait in (Linux /proc), for a failure message."""
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if entry.name == str(pid) or fields[1] == str(pid):
                wchan = (entry / "wchan").read_text()
                lines.append(f"{entry.name} state {fields[0]} ppid {fields[1]} wchan {wchan}")
        except (OSError, IndexError):
            continue
    return "; ".join(lines) or "none left"


def test_in_process_cli_after_multithreaded_torch_work_does_not_hang(tmp_path):
    """A caller that already ran a parallel torch op (a notebook, CliRunner inside pytest) has an OpenMP
    thread pool that a forked child cannot use: the child's first parallel op would hang until --timeout."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        a = torch.randn(512, 512)
        (a @ a).sum()  # start the OpenMP pool in this process
        path = tmp_path / "wide.py"
        path.write_text("import torch\nfrom torch import nn\n"
                        "model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512))\n"
                        "example_input = torch.randn(64, 512)\n")
        started = time.perf_counter()
        code, out, err = run(str(path), "--timeout", "60", "--format", "json")
        assert code in (0, 1), err  # a hang would be exit 2, "timed out"
        measurements = json.loads(out)["measurements"]
        assert measurements["profile"], measurements
        assert time.perf_counter() - started < 60
    finally:
        torch.set_num_threads(threads)
