"""`healthcheck FILE[:NAME]`: check a model file; `healthcheck rule CODE`: explain a rule."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markdown import Markdown

from healthcheck import __version__
from healthcheck.config import FAIL_LEVELS, load_config
from healthcheck.errors import UsageError
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
    healthcheck model.py:build_net     ... a specific module or zero-argument factory
    healthcheck rule HC101             explain a rule
    healthcheck rules                  list all rules
    """


def _split_codes(value: str | None) -> tuple[str, ...] | None:
    return None if value is None else tuple(c.strip().upper() for c in value.split(",") if c.strip())


@main.command()
@click.argument("target", metavar="FILE[:NAME]")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="N,C,H,W",
              help="Shape of a random example input (repeat for several inputs); overrides example_input in "
                   "the file. Token ids are drawn when the model starts with an Embedding.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True,
              help="Report format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report to this file instead of standard output.")
@click.option("--fail-on", type=click.Choice(FAIL_LEVELS), default=None,
              help="Exit with 1 when a finding is at or above this severity  [default: error].")
@click.option("--select", default=None, metavar="CODES", help="Comma-separated rule codes or prefixes to run (e.g. HC1,HC201).")
@click.option("--ignore", default=None, metavar="CODES", help="Comma-separated rule codes or prefixes to skip.")
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
def check(target: str, input_shapes: tuple[str, ...], fmt: str, output: Path | None, fail_on: str | None,
          select: str | None, ignore: str | None, tensorboard_dir: Path | None, no_probes: bool, apply_fix: bool,
          export_path: Path | None, trace: str | None, seed: int | None, device: str,
          color: bool | None, verbose: bool, debug: bool) -> None:
    """Check the model in FILE (see `healthcheck --help` for how the model is found).

    \b
    The model is NAME, else `model`, `build_model` or `get_model`, else the only nn.Module
    instance (or class) in the file. Inputs come from `example_input(s)` in the file (a
    tensor, tuple, dict or zero-argument function) or --input-shape.
    Exit codes: 0 no finding at or above --fail-on, 1 findings at or above it, 2 usage or
    load error.
    """
    from healthcheck.api import check_file, load_file
    from healthcheck.loading import parse_shape, split_spec

    err = Console(stderr=True, highlight=False)
    try:
        config = load_config(split_spec(target)[0]).override(
            fail_on=fail_on, select=_split_codes(select), ignore=_split_codes(ignore), trace=trace, seed=seed,
            input_shapes=tuple(parse_shape(s) for s in input_shapes) or None,
        )
        fixes: list = []
        if export_path is not None and not apply_fix:
            raise UsageError("--export saves a fixed model: use it with --fix")
        if apply_fix:
            if no_probes:
                raise UsageError("--fix verifies fixes by measuring again: it cannot be used with --no-probes")
            from healthcheck.fixes import fix as apply_fixes

            model, args, kwargs, name = load_file(target, config, device)
            report, fixes = apply_fixes(model, (args, kwargs), config=config, name=name)
            if export_path is not None:
                _export(fixes, export_path)
        else:
            report = check_file(target, config, device=device, probes=not no_probes)
        if tensorboard_dir is not None:
            from healthcheck.report.tensorboard import write_tensorboard

            write_tensorboard(report, tensorboard_dir)
    except UsageError as exc:
        if debug:
            err.print_exception()
        err.print(f"healthcheck: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(UsageError.exit_code)
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line and exit 2
        if debug:
            err.print_exception()
        err.print(f"healthcheck: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  markup=False, soft_wrap=True)
        sys.exit(UsageError.exit_code)

    if output is not None:
        output.write_text(render(report, fmt, verbose=verbose, fixes=fixes))
    elif fmt == "text":
        console = Console(highlight=False, no_color=color is False, force_terminal=color or None)
        from healthcheck.report.text import THEME, write_fixes, write_text

        console.push_theme(THEME)
        write_text(report, console, verbose=verbose)
        if apply_fix:
            write_fixes(report, fixes, console)
    else:
        sys.stdout.write(render(report, fmt, verbose=verbose, fixes=fixes))
    sys.exit(1 if report.fails(config.fail_on) else 0)


def _export(fixes: list, path: Path) -> None:
    import torch

    verified = [f for f in fixes if f.verified]
    if not verified:
        raise UsageError("--export: no fix was verified, nothing to save")
    try:
        torch.save(verified[0].model, path)
    except Exception as exc:  # noqa: BLE001 - pickling a user's model can fail in many ways
        raise UsageError(f"--export {path}: could not save the fixed model: {type(exc).__name__}: {exc}") from exc


@main.command()
@click.argument("code")
def rule(code: str) -> None:
    """Explain rule CODE (e.g. HC101): what, why, example, fix, options."""
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
