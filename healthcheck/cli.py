"""`healthcheck FILE[:NAME]`: check a model file; `healthcheck rule CODE`: explain a rule."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markdown import Markdown
from rich.text import Text

from healthcheck import __version__
from healthcheck.config import FAIL_LEVELS, learning_rate, momentum_value, optimizer_name, rule_codes
from healthcheck.errors import UsageError, describe, first_line
from healthcheck.records import Report
from healthcheck.report import FORMATS, render


class _DefaultGroup(click.Group):
    """`healthcheck model.py` means `healthcheck check model.py`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["check", *args]
        return super().parse_args(ctx, args)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """click's usage errors as one line with exit code 2, and Ctrl-C as exit code 130 (not 1)."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except (click.exceptions.Abort, KeyboardInterrupt):
            _interrupted()
        except click.ClickException as exc:
            hint = " (healthcheck --help lists the options)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"healthcheck: error: {first_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _interrupted()


def _interrupted() -> None:
    click.echo("healthcheck: interrupted", err=True)
    sys.exit(130)


@click.group(cls=_DefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="healthcheck")
def main() -> None:
    """Will signal and gradients propagate well through your PyTorch model?

    \b
    healthcheck model.py               check the model defined in model.py
    healthcheck models/*.py --format sarif -o healthcheck.sarif   ... several files, for CI
    healthcheck model.py:build_net     ... a specific module or zero-argument factory
    healthcheck rule HC101             explain a rule
    healthcheck rules                  list all rules

    \b
    A finding is silenced at its line with `# healthcheck: ignore[HC101]`, known findings
    with --baseline; settings come from [tool.healthcheck] in pyproject.toml (see README).
    """


#: seconds one model file may take (import, construction, trace, probes, fixes): generous, a hang guard
DEFAULT_TIMEOUT = 1200.0


@main.command(short_help="Check the models in FILE... (the default command).")
@click.argument("targets", metavar="FILE[:NAME]...", nargs=-1, required=True)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W",
              help="Shape of a random example input (repeat for several inputs); overrides example_input in "
                   "the file. Token ids are drawn when the model starts with an Embedding.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Report format: text for people; json (the documented schema); sarif for GitHub code "
                   "scanning; junit for CI test views; markdown for a pull-request comment.")
@click.option("-o", "--output", "outputs", type=click.Path(dir_okay=False, path_type=Path), multiple=True,
              help="Write the report to this file instead of standard output. Repeat to write several "
                   "formats from one run; each file's format then follows its suffix (.sarif, .json, "
                   ".xml for JUnit, .md, .txt).")
@click.option("--fail-on", type=click.Choice(FAIL_LEVELS), default=None,
              help="Exit with 1 when a finding is at or above this severity  [default: error].")
@click.option("--select", default=None, metavar="CODES", help="Comma-separated rule codes or prefixes to run (e.g. HC1,HC201).")
@click.option("--ignore", default=None, metavar="CODES", help="Comma-separated rule codes or prefixes to skip.")
@click.option("--baseline", "baseline_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A JSON report saved earlier (--format json -o FILE): its findings are known and do not "
                   "fail; new or worse ones do.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write the depth profile (each quantity against depth) and findings to TensorBoard here.")
@click.option("--no-probes", is_flag=True, help="Structure only: skip the init-time measurements (HC2xx, HC3xx) "
              "and the stability checks (HC5xx).")
@click.option("--optimizer", default=None, metavar="NAME",
              help="The optimizer the model will train with, for the stability checks (sharpness against its "
                   "stability limit, a few trial steps on a copy): sgd, adam, adamw, rmsprop, nadam, radam, "
                   "adamax or adagrad. Needs --lr. Without --optimizer or --lr the report says that stability "
                   "under the optimizer was not assessed.")
@click.option("--lr", type=float, default=None, metavar="FLOAT",
              help="The learning rate the model will train at (the peak, after warm-up), e.g. 0.05; alone it "
                   "means SGD.")
@click.option("--momentum", type=float, default=None, metavar="FLOAT",
              help="In [0, 1): SGD's or RMSprop's momentum [default: 0], or the Adam family's beta1 "
                   "[default: 0.9].")
@click.option("--fix", "apply_fix", is_flag=True,
              help="Apply each suggested fix to a copy, measure it again, and show before/after and the code change.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --fix: save the first verified fixed model here (torch.save; load with weights_only=False).")
@click.option("--trace", type=click.Choice(["auto", "fx", "export", "hooks"]), default=None,
              help="Force one tracer instead of trying fx, then torch.export, then hooks  [default: auto].")
@click.option("--seed", type=click.IntRange(min=0), default=None,
              help="Seed for model construction and random inputs  [default: 0].")
@click.option("--timeout", type=click.FloatRange(min=0), default=DEFAULT_TIMEOUT, show_default=True, metavar="SECONDS",
              help="Give up on a model file whose import or analysis takes longer (a hang), with exit code 2; "
                   "0: no limit.")
@click.option("--device", default="cpu", show_default=True, help="Device to run the model on (cpu, cuda, cuda:1).")
@click.option("--color/--no-color", default=None, help="Force colour on or off (default: on for a terminal, "
              "off when NO_COLOR is set).")
@click.option("-v", "--verbose", is_flag=True, help="Say why earlier tracers failed and show more detail.")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
def check(targets: tuple[str, ...], input_shapes: tuple[str, ...], fmt: str, outputs: tuple[Path, ...],
          fail_on: str | None, select: str | None, ignore: str | None, baseline_path: Path | None,
          tensorboard_dir: Path | None, no_probes: bool, optimizer: str | None, lr: float | None,
          momentum: float | None, apply_fix: bool, export_path: Path | None, trace: str | None, seed: int | None, timeout: float, device: str, color: bool | None, verbose: bool,
          debug: bool) -> None:
    """Check the model in each FILE and report the findings (the default command).

    \b
    The model is NAME, else `model`, `build_model` or `get_model`, else the only nn.Module
    instance (or class) in the file. Inputs come from `example_input(s)` in the file (a
    tensor, tuple, dict or zero-argument function) or --input-shape. Settings come from
    [tool.healthcheck] in the pyproject.toml above FILE; flags win.
    Exit codes: 0 no finding at or above --fail-on, 1 findings at or above it, 2 usage or
    load error (the other files are still checked and reported), 130 interrupted.
    Each FILE runs in a child process (on Linux): its prints go to stderr, and a hang
    (--timeout) or an exit in it is an error, never a pass.
    """
    err = Console(stderr=True, highlight=False)
    reports: list[Report] = []
    gates: list[str] = []
    usage_error = False
    try:
        if export_path is not None and not apply_fix:
            raise UsageError("--export saves a fixed model: use it with --fix")
        if export_path is not None and len(targets) > 1:
            raise UsageError("--export saves one fixed model: give one FILE")
        if apply_fix and no_probes:
            raise UsageError("--fix verifies fixes by measuring again: it cannot be used with --no-probes")
        if no_probes and (optimizer is not None or lr is not None or momentum is not None):
            raise UsageError("--optimizer, --lr and --momentum are for the stability checks, which --no-probes skips")
        from healthcheck.loading import parse_shape
        from healthcheck.suppression import load_baseline

        files = [(path, fmt) for path in outputs] if len(outputs) <= 1 else [(p, _format_of(p)) for p in outputs]
        # every destination is checked before minutes of analysis, not after
        for path in outputs:
            _check_writable_file(path, "-o")
        if len(set(map(os.path.abspath, outputs))) < len(outputs):
            raise UsageError("-o: the same file is named twice; give each format its own file")
        if export_path is not None:
            _check_writable_file(export_path, "--export")
        if tensorboard_dir is not None:
            _check_writable_dir(tensorboard_dir, "--tensorboard")

        shapes = tuple(parse_shape(s) for s in input_shapes) or None
        select_codes = None if select is None else rule_codes(select, "--select", allow_empty=False)
        ignore_codes = None if ignore is None else rule_codes(ignore, "--ignore", allow_empty=True)
        baseline = load_baseline(baseline_path) if baseline_path is not None else None
        flags = dict(fail_on=fail_on, select=select_codes, ignore=ignore_codes, trace=trace, seed=seed,
                     input_shapes=shapes, optimizer=None if optimizer is None else optimizer_name(optimizer, "--optimizer"),
                     lr=None if lr is None else learning_rate(lr, "--lr"),
                     momentum=None if momentum is None else momentum_value(momentum, "--momentum"))
    except UsageError as exc:
        if debug:
            err.print_exception()
        _error(err, str(exc))
        sys.exit(UsageError.exit_code)

    from healthcheck.isolate import preload, run_user_code

    preload()  # torch and the tracers' imports once here, not again in each model file's child

    detail = verbose or debug
    progress = len(targets) > 1 and fmt == "text" and not outputs
    for target in targets:
        prefix = f"{target}: " if len(targets) > 1 else ""
        if progress:
            err.print(Text(f"checking {target} …", style="dim"), soft_wrap=True)  # Text: no markup in paths
        outcome = run_user_code(_check_target, target, flags, baseline, device, no_probes, apply_fix, export_path,
                                timeout=timeout, label=target)
        _show_warnings(err, outcome.warnings, detail)
        if detail and outcome.noise.strip():
            err.print(Text(outcome.noise.rstrip()), soft_wrap=True)
        if outcome.error is not None:
            if debug and outcome.details:
                err.print(Text(outcome.details.rstrip()), soft_wrap=True)
            elif verbose and outcome.messages:
                err.print(Text(outcome.messages), soft_wrap=True)
            _error(err, (prefix if not outcome.error.startswith(target) else "") + outcome.error)
            usage_error = True
            continue
        report, gate, late_errors = outcome.value
        for message in late_errors:  # the report was computed: it is still written below
            _error(err, prefix + message)
            usage_error = True
        if tensorboard_dir is not None:
            try:
                from healthcheck.report.tensorboard import write_tensorboard

                write_tensorboard(report, tensorboard_dir if len(targets) == 1 else tensorboard_dir / report.model.name)
            except Exception as exc:  # noqa: BLE001 - a failed side output never loses the report
                _error(err, f"{prefix}--tensorboard {tensorboard_dir}: could not write: {describe(exc)}")
                usage_error = True
        reports.append(report)
        gates.append(gate)

    fail_level = _strictest(gates) if gates else (fail_on or "error")
    if reports:
        for path, file_format in files:
            text = render(reports, file_format, fail_on=fail_level, verbose=verbose)
            try:
                path.write_text(text)
            except OSError as exc:  # checked before, failed now (disk full, removed directory): keep the report
                sys.stdout.write(text)
                _error(err, f"-o {path}: could not write the report ({exc.strerror or describe(exc)}); "
                            "it was printed to standard output instead")
                usage_error = True
        if not outputs and fmt == "text":
            console = Console(highlight=False, no_color=color is False, force_terminal=color or None)
            from healthcheck.report.text import THEME, write_text

            console.push_theme(THEME)
            for i, report in enumerate(reports):
                if i:
                    console.print()
                write_text(report, console, verbose=verbose)
        elif not outputs:
            sys.stdout.write(render(reports, fmt, fail_on=fail_level, verbose=verbose))
    if usage_error:
        sys.exit(UsageError.exit_code)
    sys.exit(1 if any(r.fails(g) for r, g in zip(reports, gates)) else 0)


def _show_warnings(err: Console, caught: list, detail: bool) -> None:
    """Warnings raised while checking: the user's own as one line each; torch's and libraries' only with -v."""
    from healthcheck.isolate import users_file

    seen: set[tuple[str, str, int, str]] = set()
    for w in caught:
        own = users_file(w.filename)
        if not (own or detail):
            continue
        text = w.message if detail else first_line(w.message)
        key = (w.category, w.filename, w.lineno, text)
        if key in seen:
            continue
        seen.add(key)
        where = f"{_short(w.filename)}:{w.lineno}: " if w.filename else ""
        err.print(Text(f"healthcheck: warning: {where}{w.category}: {text}"), soft_wrap=True)


def _short(filename: str) -> str:
    try:
        relative = os.path.relpath(filename)
    except ValueError:
        return filename
    return filename if relative.startswith("..") else relative


def _check_writable_file(path: Path, flag: str) -> None:
    """A file we can create or overwrite, or one clear UsageError before any analysis runs."""
    parent = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory; give a file name such as {path / 'healthcheck.json'}")
    if not parent.exists():
        raise UsageError(f"{flag} {path}: the directory {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UsageError(f"{flag} {path}: {parent} is not a directory")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: the file is not writable")
    if not path.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the directory {parent} is not writable")


def _check_writable_dir(path: Path, flag: str) -> None:
    """A directory that exists and is writable, or can be made inside a writable one."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, not a directory")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, so the directory cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable")


def _check_target(target: str, flags: dict, baseline: dict | None, device: str, no_probes: bool, apply_fix: bool,
                  export_path: Path | None) -> tuple[Report, str, list[str]]:
    """The report of one FILE[:NAME], the fail level its settings ask for, and errors that came after the
    report was made (a failed --export): run in the child process, so only picklable results leave it."""
    from healthcheck.api import check_file, load_file, target_config

    config = target_config(target, **flags)
    _check_selection(config, no_probes)
    if not apply_fix:
        return check_file(target, config, device=device, probes=not no_probes, baseline=baseline), config.fail_on, []
    from healthcheck.fixes import fix as apply_fixes

    model, args, kwargs, name, source = load_file(target, config, device)
    report, fixes = apply_fixes(model, (args, kwargs), config=config, name=name, source=source, baseline=baseline)
    late_errors = []
    if export_path is not None:
        try:
            _export(fixes, export_path)
        except UsageError as exc:
            late_errors.append(str(exc))
    if report.fixes:  # the fixed copies stay here: their classes live in the user's file, not in the parent
        report = dataclasses.replace(report, fixes=[dataclasses.replace(f, model=None) for f in report.fixes])
    return report, config.fail_on, late_errors


def _check_selection(config: Any, no_probes: bool) -> None:
    """A select that names only rules this run cannot evaluate would pass every model: say so instead."""
    from healthcheck.rules.registry import REGISTRY, selected, stage

    # the select alone: an ignore that leaves nothing to run is explicit ("ignore HC1" with --no-probes)
    chosen = [code for code, rule in REGISTRY.items() if rule.check is not None and selected(code, config.select, ())]
    runnable = {"structure"} | (set() if no_probes else {"probes", "stability"})
    if not chosen or any(stage(code) in runnable for code in chosen):
        return
    why = ("--no-probes skips the measurements they need" if all(stage(c) != "structure" for c in chosen)
           and any(stage(c) in ("probes", "stability") for c in chosen) else
           "HC4xx rules read training steps: they run in HealthMonitor and the training callbacks")
    raise UsageError(f"select {','.join(config.select)} chooses only rules this check cannot run ({why}); "
                     "nothing would be checked")


SUFFIX_FORMATS = {".sarif": "sarif", ".json": "json", ".xml": "junit", ".md": "markdown", ".txt": "text"}


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in SUFFIX_FORMATS:
        known = ", ".join(f"{suffix} ({name})" for suffix, name in SUFFIX_FORMATS.items())
        raise UsageError(f"-o {path}: with several -o, each file's suffix names its format: {known}")
    return SUFFIX_FORMATS[path.suffix.lower()]


def _strictest(levels: list[str]) -> str:
    return min(levels, key=FAIL_LEVELS.index)


def _error(err: Console, message: str) -> None:
    """One line on stderr, printed as plain text (a path such as `runs/[red]` is not markup)."""
    err.print(Text(f"healthcheck: error: {first_line(message)}"), soft_wrap=True)


def _export(fixes: list, path: Path) -> None:
    import torch

    verified = [f for f in fixes if f.verified]
    if not verified:
        raise UsageError("--export: no fix was verified, nothing to save")
    try:
        with _importable_user_classes():
            torch.save(verified[0].model, path)
    except Exception as exc:  # noqa: BLE001 - pickling a user's model can fail in many ways
        raise UsageError(f"--export {path}: could not save the fixed model: {describe(exc)}") from exc


@contextlib.contextmanager
def _importable_user_classes() -> Iterator[None]:
    """Pickle the model file's classes as `<file stem>.<Class>` rather than under the private module name
    the file was imported as, so that `torch.load` works wherever the model file is importable."""
    from healthcheck.loading import USER_MODULE_PREFIX

    renamed: list[tuple[type, str]] = []
    added: list[str] = []
    try:
        for name, module in list(sys.modules.items()):
            stem = Path(getattr(module, "__file__", None) or "").stem
            if not name.startswith(USER_MODULE_PREFIX) or not stem.isidentifier() or stem in sys.modules:
                continue
            sys.modules[stem] = module
            added.append(stem)
            for value in vars(module).values():
                if isinstance(value, type) and value.__module__ == name:
                    renamed.append((value, name))
                    value.__module__ = stem
        yield
    finally:
        for cls, name in renamed:
            cls.__module__ = name
        for stem in added:
            del sys.modules[stem]


@main.command(short_help="Explain a rule: what, why, example, fix, options.")
@click.argument("code")
def rule(code: str) -> None:
    """Explain rule CODE: what, why, example, fix and options (healthcheck rule HC101)."""
    from healthcheck.rules import REGISTRY

    found = REGISTRY.get(code.upper())
    if found is None:
        click.echo(f"healthcheck: error: no rule {code!r}; known: {', '.join(sorted(REGISTRY))}", err=True)
        sys.exit(2)
    Console().print(Markdown(found.docs()))


@main.command(name="rules")
def list_rules() -> None:
    """List every rule with its code and summary."""
    from healthcheck.rules import REGISTRY

    for code in sorted(REGISTRY):
        click.echo(f"{code}  {REGISTRY[code].name:<30} {REGISTRY[code].summary}")


def entry_point() -> None:
    """The `healthcheck` console script and `python -m healthcheck`."""
    from healthcheck.isolate import mark_entry_point

    mark_entry_point()
    main()
