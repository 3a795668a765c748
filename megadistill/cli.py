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
    from megadistill.teachers.conversion import convert_pretrained

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
    p.add_argument(
        "teacher",
        help="a Hugging Face folder, a config.json, or a shipped recipe/config name "
        "(olmo3_7b, llama31_8b, qwen25_7b_instruct)",
    )
    p.add_argument("overrides", nargs="*", help="hybrid settings, e.g. window=512")


@command("inspect", "teacher vs student parameter counts (meta device, no weights)", _inspect_args)
def _cmd_inspect(args: argparse.Namespace) -> int:
    from megadistill.teachers.conversion import inspect_teacher

    print(inspect_teacher(args.teacher, overrides=args.overrides))
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="RECIPE_OR_TEACHER",
        help="stage YAML, pipeline recipe YAML, student folder, teacher folder/config.json, "
        "or a shipped recipe/config name (olmo3_7b, llama31_8b, qwen25_7b_instruct)",
    )
    p.add_argument(
        "hybrid", nargs="*", help="hybrid settings, e.g. chunk_size=64 mlstm_backend=triton"
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-mem", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB")
    p.add_argument(
        "--cpu-mem", default=None, help="CPU memory of one node, e.g. 1TB (unchecked if unset)"
    )
    # Each defaults to the recipe's value, else the planner's default.
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--micro-batch", type=int, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None)
    p.add_argument("--activation-checkpointing", choices=["on", "off"], default=None)


@command("plan", "per-rank memory of each stage and the smallest offload that fits", _plan_args)
def _cmd_plan(args: argparse.Namespace) -> int:
    from megadistill.config import apply_overrides, parse_size
    from megadistill.plan import format_plan, plan_from_cli

    overrides = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "gpu_mem": parse_size(args.gpu_mem),
        "cpu_mem": parse_size(args.cpu_mem) if args.cpu_mem else None,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "top_k": args.top_k,
        "precision": args.precision,
        "activation_checkpointing": None
        if args.activation_checkpointing is None
        else args.activation_checkpointing == "on",
    }
    keep = {"nodes", "gpus_per_node", "gpu_mem", "cpu_mem"}
    overrides = {k: v for k, v in overrides.items() if v is not None or k in keep}
    hybrid = apply_overrides({}, args.hybrid)
    plan = plan_from_cli(args.source, overrides, hybrid)
    print(format_plan(plan))
    if args.source.endswith((".yaml", ".yml")):  # a pipeline recipe: its prepare step too
        from megadistill.config import load_yaml
        from megadistill.data.prepare import format_estimates, prepare_estimates

        raw = load_yaml(args.source)
        if "experts" in raw:
            cpus = ((raw.get("resources") or {}).get("prepare") or {}).get("cpus_per_task", 1)
            print(format_estimates(prepare_estimates(raw), int(cpus)))
    return 0 if all(p.fits for p in plan.stages.values()) else 1


def _choose_layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher Hugging Face folder")
    p.add_argument(
        "--text",
        nargs="+",
        required=True,
        help="calibration text from the training mix (.txt/.jsonl)",
    )
    p.add_argument("--window", type=int, required=True, help="the student's sliding window W")
    p.add_argument("--num-sinks", type=int, default=4)
    p.add_argument("--k", type=int, default=2, help="layers to keep as softmax attention")
    p.add_argument("--num-docs", type=int, default=6, help="calibration documents used")
    p.add_argument("--max-length", type=int, default=1024, help="tokens scored per document")
    p.add_argument("--out", default=None, help="write the per-layer measurement as JSON")
    p.add_argument(
        "--criterion",
        default="nll",
        choices=["nll", "retrieval", "both", "kl"],
        help="rank by beyond-W NLL of the text, by the needle answer's log-probability, or both "
        "(the two rankings taken in turn, retrieval first), all on the untrained floor; or kl: "
        "the drop of the trained --student's beyond-W KL to the teacher",
    )
    p.add_argument(
        "--student",
        default=None,
        help="trained student folder: the one --criterion kl ranks in, and where --curve is "
        "measured (the top k layers given full attention inside it; default: the floor)",
    )
    p.add_argument(
        "--greedy",
        action="store_true",
        help="--criterion kl: pick the k layers greedily (each pick measured beside the ones "
        "before it; k passes instead of one)",
    )
    p.add_argument("--needle-length", type=int, default=1024, help="probe length (retrieval)")
    p.add_argument(
        "--curve",
        default=None,
        help="also measure the top-k layers of each ranking kept, e.g. 0,1,2,4,8: beyond-W NLL "
        "and needle scores per k (--niah lengths)",
    )
    p.add_argument("--niah", default="1024,2048", help="needle lengths of --curve")
    p.add_argument(
        "--ranking",
        action="append",
        metavar="NAME=LAYERS",
        help="also put this ranking on --curve, e.g. both=18,23,20,21 (repeatable): a ranking "
        "measured before, compared on the same floor or --student",
    )


@command(
    "choose-layers",
    "measure which teacher layers to keep as softmax attention (hybrid.softmax_layers)",
    _choose_layers_args,
)
def _cmd_choose_layers(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megadistill.errors import MegadistillError
    from megadistill.eval.layer_choice import (
        check_rankings,
        combine_rankings,
        format_curve,
        format_ranking,
        layer_curve,
        rank_by_kl,
        rank_softmax_layers,
    )
    from megadistill.eval.runner import read_documents
    from megadistill.integrity import atomic_write_json

    docs = read_documents(args.text)[: args.num_docs]
    given = {}
    for item in args.ranking or []:
        name, _, layers = item.partition("=")
        try:
            given[name] = [int(i) for i in layers.split(",")]
        except ValueError:
            raise MegadistillError(
                f"--ranking {item!r}: expected NAME=LAYER,LAYER,... (e.g. both=18,23,20,21)"
            ) from None
        if not name:
            raise MegadistillError(f"--ranking {item!r}: the ranking needs a name (NAME=...)")
        measured = {"kl"} if args.criterion == "kl" else {args.criterion, "nll", "retrieval"}
        if name in measured:  # it would replace the ranking this run measures
            raise MegadistillError(
                f"--ranking {item!r}: {name!r} is a ranking this run measures "
                f"(--criterion {args.criterion}): give the one measured before another name, "
                f"e.g. {name}_floor={layers}"
            )
    if given and not args.curve:
        raise MegadistillError("--ranking adds a ranking to --curve: pass --curve as well")
    if given:  # refused now, not after the rankings' passes
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args.teacher).get_text_config()
        check_rankings(given, config.num_hidden_layers)
    if args.criterion == "kl" and not args.student:
        raise MegadistillError("--criterion kl needs --student (a trained student folder)")
    if args.student and args.criterion != "kl" and not args.curve:
        raise MegadistillError(
            "--student is the kl criterion's student or where --curve is measured: pass "
            "--criterion kl or --curve"
        )
    if args.criterion == "kl":
        result = rank_by_kl(
            args.teacher, args.student, docs, max_length=args.max_length,
            greedy=args.k if args.greedy else 0,
        )  # fmt: skip
        print(format_ranking(result, args.k))
        orders = {"kl": result["ranking"]}
    else:
        criteria = ("nll", "retrieval") if args.criterion == "both" else (args.criterion,)
        rankings = {}
        for criterion in criteria:
            rankings[criterion] = rank_softmax_layers(
                args.teacher, docs, window=args.window, num_sinks=args.num_sinks,
                max_length=args.max_length, criterion=criterion, needle_length=args.needle_length,
            )  # fmt: skip
            print(format_ranking(rankings[criterion], args.k))
        orders = {c: r["ranking"] for c, r in rankings.items()}
        result = dict(rankings[criteria[0]])
        if len(criteria) > 1:
            orders["both"] = combine_rankings(orders["retrieval"], orders["nll"])
            both = sorted(orders["both"][: args.k])
            print(f"softmax_layers for k = {args.k} (both, in turn): {both}")
            result["rankings"] = rankings
            result["ranking"] = orders["both"]
    if args.curve:
        curve = layer_curve(
            args.teacher, docs, {**orders, **given},
            window=args.window, num_sinks=args.num_sinks, max_length=args.max_length,
            ks=[int(k) for k in args.curve.split(",")],
            needle_lengths=[int(n) for n in args.niah.split(",")], student_dir=args.student,
        )  # fmt: skip
        result["curve"] = curve
        print(format_curve(curve))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


def _choose_heads_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher Hugging Face folder")
    p.add_argument("--k", type=int, default=12, help="KV heads to keep as softmax attention")
    p.add_argument("--needle-length", type=int, default=1024, help="probe length (tokens)")
    p.add_argument("--trials", type=int, default=2, help="probes per depth (3 depths)")
    p.add_argument("--out", default=None, help="write the per-head scores as JSON")


@command(
    "choose-heads",
    "rank the teacher's KV heads by attention on a needle (hybrid.softmax_heads)",
    _choose_heads_args,
)
def _cmd_choose_heads(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megadistill.errors import MegadistillError
    from megadistill.eval.layer_choice import format_heads, rank_heads
    from megadistill.integrity import atomic_write_json

    if args.k < 1 or args.trials < 1:
        raise MegadistillError(f"--k and --trials must be >= 1, got {args.k} and {args.trials}")
    result = rank_heads(args.teacher, needle_length=args.needle_length, num_trials=args.trials)
    print(format_heads(result, args.k))
    if args.out:
        atomic_write_json(Path(args.out), result)
    return 0


# ----------------------------------------------------------------------------- pipeline commands
def _pipeline_args(p: argparse.ArgumentParser) -> None:
    from megadistill.pipeline.recipe import STEP_NAMES

    sub = p.add_subparsers(dest="pipeline_command", required=True, metavar="ACTION")
    for name, help_text in (("submit", "submit the DAG to SLURM"), ("run", "run the DAG")):
        q = sub.add_parser(name, help=help_text, description=help_text)
        q.add_argument("recipe", help="pipeline recipe YAML")
        q.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seed=1")
        q.add_argument("--run-dir", help="run directory (default: runs/<recipe name>)")
        if name == "run":
            q.add_argument("--local", action="store_true", help="on this machine, without SLURM")
    q = sub.add_parser("status", help="where each job of a run (SLURM or local) stands, and why")
    q.add_argument("run_dir")
    q.add_argument("--wait", type=float, metavar="SECONDS", help="poll until every job ended")
    q = sub.add_parser("step", help="(in a job) run one step's commands in this rank")
    q.add_argument("run_dir")
    q.add_argument("step", choices=STEP_NAMES)
    q.add_argument("--index", type=int, help="array task (default: $SLURM_ARRAY_TASK_ID)")


@command(
    "pipeline",
    "convert -> prepare data -> experts -> merge -> final -> eval, on SLURM or locally",
    _pipeline_args,
)
def _cmd_pipeline(args: argparse.Namespace) -> int:
    from megadistill.pipeline import load_recipe, local, slurm, step

    action = args.pipeline_command
    if action == "step":
        return step.run_step(args.run_dir, args.step, args.index)
    if action == "status":
        status_fn = local.status if local.is_local_run(args.run_dir) else slurm.status
        rows = (
            slurm.wait(args.run_dir, args.wait, status_fn=status_fn)
            if args.wait
            else status_fn(args.run_dir)
        )
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
    try:
        local.run_local(recipe, run_dir)
    except local.RunStopped as exc:  # SIGTERM / SIGINT: the shell's code for that signal
        print(f"megadistill pipeline: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


# ----------------------------------------------------------------------------- eval commands
def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher Hugging Face folder")
    p.add_argument("--student", required=True, help="student Hugging Face folder")
    p.add_argument(
        "--tasks", required=True, help="e.g. offline:arc_easy@5,piqa | arc_easy | tiny_mc"
    )
    p.add_argument("--limit", type=int, default=None, help="documents per task (default: all)")
    p.add_argument("--num-fewshot", type=int, default=0, help="tasks without their own @k")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=2048, help="longest model input (tokens)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ppl-text", nargs="*", default=[], help="held-out text: .txt or .jsonl files")
    p.add_argument("--niah", default="", help="needle-in-a-haystack lengths, e.g. 256,512,1024")
    p.add_argument("--niah-trials", type=int, default=None, help="needles per depth (default: 20+)")
    p.add_argument(
        "--heldout", nargs="*", default=[], help="loss by position: NAME:in|out:PATH (.txt/.jsonl)"
    )
    p.add_argument("--positions-max-length", type=int, default=None, help="default: --max-length")
    p.add_argument("--positions-window", type=int, default=None, help="default: the student's W")
    floor = p.add_mutually_exclusive_group()
    floor.add_argument("--floor", action="store_true", help="add the SWA floor (default: hybrid)")
    floor.add_argument("--no-floor", action="store_true", help="no SWA floor")
    p.add_argument("--cache-dir", default=None, help="teacher result cache (default: asset cache)")
    p.add_argument("--no-cache", action="store_true", help="always re-run the teacher")
    p.add_argument("--out", required=True, help="new folder for results.json, report.md, PNG")


@command("eval", "lm-eval teacher vs student: recovery, C_alpha, alpha*, NIAH, report", _eval_args)
def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megadistill.assets import cache_root
    from megadistill.config import parse_csv
    from megadistill.eval.heldout import parse_heldout
    from megadistill.eval.lmeval import EvalSettings
    from megadistill.eval.runner import read_documents, run_eval

    settings = EvalSettings(
        tasks=args.tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
    )
    cache = None if args.no_cache else Path(args.cache_dir or cache_root() / "eval-teacher")
    report = run_eval(
        args.teacher,
        args.student,
        settings,
        args.out,
        cache_dir=cache,
        ppl_documents=read_documents(args.ppl_text),
        niah_lengths=parse_csv(args.niah, int, "--niah"),
        niah_trials=args.niah_trials,
        heldout=parse_heldout(args.heldout),
        positions_max_length=args.positions_max_length,
        positions_window=args.positions_window,
        floor=True if args.floor else False if args.no_floor else None,
    )
    print(report)
    return 0


def _compare_positions_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher Hugging Face folder")
    p.add_argument("students", nargs="+", metavar="NAME=DIR", help="student folders to compare")
    p.add_argument(
        "--heldout", nargs="+", required=True, metavar="NAME:in|out:PATH",
        help="held-out sets (.txt/.jsonl), labelled in- or out-of-domain for the training mix",
    )  # fmt: skip
    p.add_argument("--max-length", type=int, default=2048, help="tokens scored per document")
    p.add_argument("--cache-dir", default=None, help="teacher/floor loss cache (default: assets)")
    p.add_argument(
        "--reference", default=None, metavar="NAME",
        help="a student that is a floor too (e.g. a SWA-only student trained through the same "
        "stage II): every other student's share of its gap is reported",
    )  # fmt: skip
    p.add_argument(
        "--niah", default="", metavar="LENGTHS",
        help="needle lengths, e.g. 1024,2048: teacher, floor and every student get the same "
        "probes (exact match, digits, answer logp) in the same report",
    )  # fmt: skip
    p.add_argument("--out", required=True, help="folder for positions.json and positions.md")


@command(
    "compare-positions",
    "students vs teacher and SWA floor by position, side by side (stage I choices)",
    _compare_positions_args,
)
def _cmd_compare_positions(args: argparse.Namespace) -> int:
    from pathlib import Path

    from megadistill.assets import cache_root
    from megadistill.config import parse_csv
    from megadistill.errors import MegadistillError
    from megadistill.eval.heldout import parse_heldout
    from megadistill.eval.levers import compare_students, write_comparison

    niah = parse_csv(args.niah, int, "--niah")
    students = {}
    for item in args.students:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise MegadistillError(f"student {item!r} must look like NAME=DIR")
        students[name] = path
    result = compare_students(
        args.teacher, students, parse_heldout(args.heldout), max_length=args.max_length,
        cache_dir=Path(args.cache_dir) if args.cache_dir else cache_root() / "eval-teacher",
        reference=args.reference, niah=niah,
    )  # fmt: skip
    print(write_comparison(result, args.out).read_text())
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="folders written by eval")
    p.add_argument("--out", default=None, help="folder for comparison.md (several runs)")


@command("report", "rebuild eval reports from saved results; compare several runs", _report_args)
def _cmd_report(args: argparse.Namespace) -> int:
    from megadistill.eval.report import compare_runs

    print(compare_runs(args.run_dirs, args.out))
    return 0


# ----------------------------------------------------------------------------- merge commands
def _merge_args(p: argparse.ArgumentParser) -> None:
    from megadistill.merge.commands import add_merge_args

    add_merge_args(p)


@command("merge", "merge expert ZeRO-3 checkpoints into one Hugging Face model", _merge_args)
def _cmd_merge(args: argparse.Namespace) -> int:
    from megadistill.merge.commands import run_merge

    return run_merge(args)


def _inspect_ckpt_args(p: argparse.ArgumentParser) -> None:
    from megadistill.merge.commands import add_inspect_args

    add_inspect_args(p)


@command("inspect-ckpt", "checkpoint tags, steps, ranks, tensors, integrity", _inspect_ckpt_args)
def _cmd_inspect_ckpt(args: argparse.Namespace) -> int:
    from megadistill.merge.commands import run_inspect

    return run_inspect(args)


# ----------------------------------------------------------------------------- stages
def _stage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML stage config (see megadistill/recipes/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    if stage != "teacher-targets":  # a trainer: preemption signals from here on are kept
        from megadistill.engine.signals import catch_early

        catch_early()
    overrides = list(args.overrides)
    if args.recipe and "=" in args.recipe:  # only overrides were given
        overrides.insert(0, args.recipe)
        args.recipe = None
    if getattr(args, "resume", False):
        overrides.append("trainer.resume=true")
    from megadistill.engine.distributed import collective_guard
    from megadistill.stages.runner import load_stage_config

    with collective_guard():  # a dead or hung peer rank -> one clear error naming it
        if stage == "teacher-targets":
            from megadistill.stages.teacher_targets import run_teacher_targets

            run_teacher_targets(load_stage_config(args.recipe, ["stage=distill", *overrides]))
            return 0
        from megadistill.pipeline.stage import run_stage

        return run_stage(load_stage_config(args.recipe, [f"stage={stage}", *overrides])).exit_code


@command(
    "align", "stage I: layer-wise alignment of the new parameters (run on every rank)", _stage_args
)
def _cmd_align(args: argparse.Namespace) -> int:
    return _run_stage("align", args)


@command("distill", "stage II: CE + top-k KL distillation (run on every rank)", _stage_args)
def _cmd_distill(args: argparse.Namespace) -> int:
    return _run_stage("distill", args)


@command(
    "teacher-targets", "precompute the teacher's top-k targets for offline stage II", _stage_args
)
def _cmd_teacher_targets(args: argparse.Namespace) -> int:
    return _run_stage("teacher-targets", args)


def _prepare_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="?", help="YAML stage config (its data and student keys)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.seq_len=4096")


@command("prepare-data", "tokenise + pack a recipe's data into the cache", _prepare_data_args)
def _cmd_prepare_data(args: argparse.Namespace) -> int:
    import json

    from megadistill.data.prepare import prepare_from_recipe

    overrides = list(args.overrides)
    if args.recipe and "=" in args.recipe:  # only overrides were given
        overrides.insert(0, args.recipe)
        args.recipe = None
    print(json.dumps(prepare_from_recipe(args.recipe, overrides), indent=2))
    return 0


# ----------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny random teacher: ~1 min, not ~15")
    size.add_argument("--quality", action="store_true", help="the quality benchmark (~100 min)")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. hybrid.window=512")
    p.add_argument("--run-dir", default="runs/demo", help="output folder (default: runs/demo)")
    p.add_argument(
        "--keep-softmax",
        type=int,
        default=None,
        metavar="K",
        help="keep K layers as softmax attention, chosen by measurement (`choose-layers`), "
        "instead of the recipe's softmax layers and heads (0: none)",
    )
    from megadistill.eval.layer_choice import CHOICES

    p.add_argument(
        "--layer-criterion", choices=CHOICES, default=None,
        help="how --keep-softmax ranks layers (default: both with --quality, else nll)",
    )  # fmt: skip
    p.add_argument(
        "--keep-heads", type=int, default=None, metavar="K",
        help="keep the teacher's K best retrieval heads as softmax attention (`choose-heads`) "
        "instead of the recipe's softmax layers and heads (with --keep-softmax: beside those "
        "layers; 0: none)",
    )  # fmt: skip


@command("demo", "the whole pipeline on CPU with a real teacher and real data", _demo_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    from megadistill.demo import DemoConfig, run_demo

    cfg = DemoConfig(
        quick=args.quick,
        quality=args.quality,
        run_dir=args.run_dir,
        overrides=tuple(args.overrides),
        keep_softmax=args.keep_softmax,
        layer_criterion=args.layer_criterion,
        keep_heads=args.keep_heads,
    )
    report = run_demo(cfg)
    print(f"report: {report}")
    return 0


# ----------------------------------------------------------------------------- benchmarks
# megadistill.bench.<name> -> (its config class, run function, table formatter)
_BENCHES = {
    "inference": ("InferenceBenchConfig", "run_inference_bench", "format_rows"),
    "generate": ("GenerateBenchConfig", "run_generate_bench", "format_result"),
    "train": ("TrainBenchConfig", "run_train_bench", "format_summary"),
    "data": ("DataBenchConfig", "run_data_bench", "format_rows"),
    "merge": ("MergeBenchConfig", "run_merge_bench", "format_results"),
    "memory": ("MemoryBenchConfig", "run_memory_bench", "format_rows"),
}


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", choices=list(_BENCHES), help="which benchmark")
    p.add_argument("overrides", nargs="*", help="settings, e.g. contexts=[1024,4096] batch_size=8")


@command("bench", "benchmarks: teacher vs student side by side; data; merge", _bench_args)
def _cmd_bench(args: argparse.Namespace) -> int:
    import importlib
    import json

    from megadistill.config import apply_overrides, from_dict

    config, run, fmt = _BENCHES[args.which]
    bench = importlib.import_module(f"megadistill.bench.{args.which}")
    result = getattr(bench, run)(
        from_dict(getattr(bench, config), apply_overrides({}, args.overrides))
    )
    print(getattr(bench, fmt)(result))
    print(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------- self-test
def _selftest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", action="store_true", help="GPU kernels, stage II MFU, inference")
    p.add_argument("--dry-run", action="store_true",
                   help="rehearse --gpu on CPU: small shapes, Triton interpreted, Flex forward")  # fmt: skip
    p.add_argument("--out", default="selftest.json", help="JSON results file")
    p.add_argument("--budget-s", type=float, default=450.0, help="overall time budget (s)")


@command("selftest", "kernels vs float64 references (--gpu: + MFU, inference)", _selftest_args)
def _cmd_selftest(args: argparse.Namespace) -> int:
    from megadistill.selftest import format_table, ok, run_selftest

    results = run_selftest(args.gpu, args.out, args.budget_s, dry_run=args.dry_run)
    print(format_table(results))
    print(f"results written to {args.out}")
    return 0 if ok(results) else 1


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
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow flags (`distill R.yaml --resume optim.lr=1e-5`): argparse leaves the
    # positionals after an option unparsed, so they are taken here.
    if extra and hasattr(args, "overrides") and all("=" in a and a[0] != "-" for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from megadistill.logs import setup_logging

    setup_logging(debug=args.verbose)
    from megadistill.versions import check_environment

    check_environment()  # one line per dependency outside the tested versions, before any work
    try:
        code = int(args._handler(args) or 0)
        if "torch.distributed" in sys.modules:  # a rank of a distributed command that returned
            from megadistill.engine.distributed import finish_distributed

            finish_distributed()
        return code
    except Exception as exc:  # noqa: BLE001 - the CLI turns library errors into one clear line
        from megadistill.config import ConfigError
        from megadistill.errors import MegadistillError

        if isinstance(exc, (ConfigError, MegadistillError)):
            print(f"megadistill {args.command}: error: {exc}", file=sys.stderr)
            return int(getattr(exc, "exit_code", 2))  # a stopped local run: 128 + the signal
        raise


if __name__ == "__main__":
    sys.exit(main())
