"""`healthcheck FILE[:NAME]`: check a model file; `healthcheck rule CODE`: explain a rule."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown

from healthcheck import __version__
from healthcheck.config import FAIL_LEVELS
from healthcheck.errors import UsageError
from healthcheck.records import Report
from healthcheck.report import FORMATS, render


class _DefaultGroup(click.Group):
    """`healthcheck model.py` means `healthcheck check model.py`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["check", *args]
        return super().parse_args(ctx, args)


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


def _split_codes(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(c.strip().upper() for c in value.split(",") if c.strip())


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
@click.option("--no-probes", is_flag=True, help="Structure only: skip the init-time measurements (HC2xx, HC3xx).")
@click.option("--fix", "apply_fix", is_flag=True,
              help="Apply each suggested fix to a copy, measure it again, and show before/after and the code change.")
@click.option("--export", "export_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="With --fix: save the first verified fixed model here (torch.save; load with weights_only=False).")
@click.option("--trace", type=click.Choice(["auto", "fx", "export", "hooks"]), default=None,
              help="Force one tracer instead of trying fx, then torch.export, then hooks  [default: auto].")
@click.option("--seed", type=int, default=None, help="Seed for model construction and random inputs  [default: 0].")
@click.option("--device", default="cpu", show_default=True, help="Device to run the model on (cpu, cuda, cuda:1).")
@click.option("--color/--no-color", default=None, help="Force colour on or off (default: on for a terminal, "
              "off when NO_COLOR is set).")
@click.option("-v", "--verbose", is_flag=True, help="Say why earlier tracers failed and show more detail.")
@click.option("--debug", is_flag=True, help="Show the full traceback of errors.")
def check(targets: tuple[str, ...], input_shapes: tuple[str, ...], fmt: str, outputs: tuple[Path, ...],
          fail_on: str | None, select: str | None, ignore: str | None, baseline_path: Path | None,
          tensorboard_dir: Path | None, no_probes: bool, apply_fix: bool, export_path: Path | None,
          trace: str | None, seed: int | None, device: str, color: bool | None, verbose: bool, debug: bool) -> None:
    """Check the model in each FILE and report the findings (the default command).

    \b
    The model is NAME, else `model`, `build_model` or `get_model`, else the only nn.Module
    instance (or class) in the file. Inputs come from `example_input(s)` in the file (a
    tensor, tuple, dict or zero-argument function) or --input-shape. Settings come from
    [tool.healthcheck] in the pyproject.toml above FILE; flags win.
    Exit codes: 0 no finding at or above --fail-on, 1 findings at or above it, 2 usage or
    load error (the other files are still checked and reported).
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
        from healthcheck.loading import parse_shape
        from healthcheck.suppression import load_baseline

        files = [(path, fmt) for path in outputs] if len(outputs) <= 1 else [(p, _format_of(p)) for p in outputs]

        shapes = tuple(parse_shape(s) for s in input_shapes) or None
        baseline = load_baseline(baseline_path) if baseline_path is not None else None
        flags = dict(fail_on=fail_on, select=_split_codes(select), ignore=_split_codes(ignore), trace=trace,
                     seed=seed, input_shapes=shapes)
    except UsageError as exc:
        _error(err, exc, debug)
        sys.exit(UsageError.exit_code)

    progress = len(targets) > 1 and fmt == "text" and not outputs
    for target in targets:
        if progress:
            err.print(f"checking {target} …", style="dim")
        try:
            report, gate = _check_target(target, flags, baseline, device, no_probes, apply_fix, export_path)
            if tensorboard_dir is not None:
                from healthcheck.report.tensorboard import write_tensorboard

                write_tensorboard(report, tensorboard_dir if len(targets) == 1 else tensorboard_dir / report.model.name)
        except Exception as exc:  # noqa: BLE001 - every failure is one line and exit 2, the others go on
            _error(err, exc, debug, prefix=f"{target}: " if len(targets) > 1 else "")
            usage_error = True
            continue
        reports.append(report)
        gates.append(gate)

    fail_level = _strictest(gates) if gates else (fail_on or "error")
    if reports:
        for path, file_format in files:
            path.write_text(render(reports, file_format, fail_on=fail_level, verbose=verbose))
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


def _check_target(target: str, flags: dict, baseline: dict | None, device: str, no_probes: bool, apply_fix: bool,
                  export_path: Path | None) -> tuple[Report, str]:
    """The report of one FILE[:NAME] and the fail level its settings ask for."""
    from healthcheck.api import check_file, load_file, target_config

    config = target_config(target, **flags)
    if not apply_fix:
        return check_file(target, config, device=device, probes=not no_probes, baseline=baseline), config.fail_on
    from healthcheck.fixes import fix as apply_fixes

    model, args, kwargs, name, source = load_file(target, config, device)
    report, fixes = apply_fixes(model, (args, kwargs), config=config, name=name, source=source, baseline=baseline)
    if export_path is not None:
        _export(fixes, export_path)
    return report, config.fail_on


SUFFIX_FORMATS = {".sarif": "sarif", ".json": "json", ".xml": "junit", ".md": "markdown", ".txt": "text"}


def _format_of(path: Path) -> str:
    if path.suffix.lower() not in SUFFIX_FORMATS:
        known = ", ".join(f"{suffix} ({name})" for suffix, name in SUFFIX_FORMATS.items())
        raise UsageError(f"-o {path}: with several -o, each file's suffix names its format: {known}")
    return SUFFIX_FORMATS[path.suffix.lower()]


def _strictest(levels: list[str]) -> str:
    return min(levels, key=FAIL_LEVELS.index)


def _error(err: Console, exc: BaseException, debug: bool, prefix: str = "") -> None:
    if debug:
        err.print_exception()
    if isinstance(exc, UsageError):
        message = str(exc)
    else:
        message = f"{type(exc).__name__}: {exc} (run with --debug for the traceback)"
    err.print(f"healthcheck: error: {prefix}{message}", markup=False, soft_wrap=True)


def _export(fixes: list, path: Path) -> None:
    import torch

    verified = [f for f in fixes if f.verified]
    if not verified:
        raise UsageError("--export: no fix was verified, nothing to save")
    try:
        torch.save(verified[0].model, path)
    except Exception as exc:  # noqa: BLE001 - pickling a user's model can fail in many ways
        raise UsageError(f"--export {path}: could not save the fixed model: {type(exc).__name__}: {exc}") from exc


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
