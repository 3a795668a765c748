"""`megadistill <subcommand>`: parse arguments, load config, call one library function.

Each subcommand is one ``_cmd_*`` function that imports its library lazily, so ``--help`` and
light commands start fast (torch and DeepSpeed are heavy imports).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

Handler = Callable[[argparse.Namespace], int | None]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help_text: str, add_args: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand handler."""

    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help_text, add_args, fn)
        return fn

    return deco


def _no_args(parser: argparse.ArgumentParser) -> None:
    del parser


# ----------------------------------------------------------------------------- model commands
def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="Hugging Face model folder of the teacher")
    p.add_argument("--out", required=True, help="output folder for the student")
    p.add_argument("overrides", nargs="*", help="hybrid settings, e.g. window=512 num_sinks=4")


@command("convert", "convert a teacher checkpoint into an initial hybrid student", _convert_args)
def _cmd_convert(args: argparse.Namespace) -> int:
    from megadistill.teachers.convert import convert_pretrained

    out = convert_pretrained(args.teacher, args.out, overrides=args.overrides)
    logging.getLogger("megadistill").info("student written to %s", out)
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="student (or teacher) Hugging Face folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)


@command("generate", "greedy generation with the recurrent cache", _generate_args)
def _cmd_generate(args: argparse.Namespace) -> int:
    from megadistill.model.generate import generate_text

    print(generate_text(args.model, args.prompt, max_new_tokens=args.max_new_tokens))
    return 0


def _inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help="a Hugging Face folder, a config.json, or a shipped 7B name")
    p.add_argument("overrides", nargs="*", help="hybrid settings, e.g. window=512")


@command("inspect", "teacher vs student parameter counts (meta device, no weights)", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    from megadistill.teachers.convert import inspect_teacher

    print(inspect_teacher(args.teacher, overrides=args.overrides))
    return 0


# ----------------------------------------------------------------------------- pipeline commands
def _pipeline_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    for name, help_text in (("submit", "submit the DAG to SLURM"), ("run", "run the DAG")):
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("recipe", help="pipeline recipe YAML")
        q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seed=1")
        q.add_argument("--run-dir", help="run directory (default: runs/<recipe name>)")
        if name == "run":
            q.add_argument("--local", action="store_true", help="on this machine, without SLURM")
    q = sub.add_parser("status", help="where each SLURM job of a run stands, and why")
    q.add_argument("run_dir")
    q.add_argument("--wait", type=float, metavar="SECONDS", help="poll until every job ended")
    q = sub.add_parser("step", help="(in a job) run one step's commands in this rank")
    q.add_argument("run_dir")
    q.add_argument("step", choices=("expert", "merge", "final", "eval"))
    q.add_argument("--index", type=int, help="array task (default: $SLURM_ARRAY_TASK_ID)")


@command("pipeline", "the expert -> merge -> final -> eval DAG on SLURM or locally", _pipeline_args)
def _cmd_pipeline(args: argparse.Namespace) -> int:
    from megadistill.pipeline import load_recipe, local, slurm, step

    action = args.pipeline_command
    if action == "step":
        return step.run_step(args.run_dir, args.step, args.index)
    if action == "status":
        rows = slurm.wait(args.run_dir, args.wait) if args.wait else slurm.status(args.run_dir)
        print(slurm.format_status(rows))
        return 0 if all(r.state == "COMPLETED" for r in rows) or not args.wait else 1
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = args.run_dir or f"runs/{recipe.name}"
    if action == "submit":
        jobs = slurm.submit(recipe, run_dir)
        for name, info in jobs["steps"].items():
            print(f"{name}: {info['job_id']}")
        return 0
    if not args.local:
        raise slurm.PipelineError("pipeline run needs --local; use `pipeline submit` for SLURM")
    local.run_local(recipe, run_dir)
    return 0


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megadistill", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, fn) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_handler=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megadistill.logs import setup_logging

    setup_logging(debug=args.verbose)
    try:
        return int(args._handler(args) or 0)
    except Exception as exc:  # noqa: BLE001 - the CLI turns library errors into one clear line
        from megadistill.config import ConfigError
        from megadistill.errors import MegadistillError

        if isinstance(exc, (ConfigError, MegadistillError)):
            print(f"megadistill {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
