"""``hooked-vlm organisms train|eval|list``: train, evaluate and list the model organisms.

Wired into ``hooked_vlm.cli`` by ``add_parser(subparsers)``; ``python -m hooked_vlm.organisms.train NAME``
is the same as ``hooked-vlm organisms train NAME``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

__all__ = ["add_parser", "add_arguments", "run", "organism_rows", "main"]


#: shown by ``hooked-vlm organisms --help`` (this module is the subcommand of ``hooked_vlm.cli.COMMANDS``)
description = "Model organisms: tiny VLMs of real architectures trained on synthetic tasks with planted ground truth."


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``organisms`` command (with ``train``, ``eval``, ``list``) to a subparsers object."""
    parser = subparsers.add_parser("organisms", help="train, evaluate and list the model organisms (tiny trained VLMs)",
                                   description=description)
    add_arguments(parser)
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    """Run the chosen ``organisms`` subcommand."""
    return args.organisms_handler(args, stdout)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``train`` / ``eval`` / ``list`` subcommands and their options."""
    from hooked_vlm.organisms import list_organisms

    names = list_organisms()
    sub = parser.add_subparsers(dest="organisms_command", required=True)
    train = sub.add_parser("train", help="train an organism from scratch and save its checkpoint")
    train.add_argument("name", choices=names)
    train.add_argument("--out", default=None, help="checkpoint folder (default: the shipped checkpoint folder in the package)")
    train.add_argument("--seed", type=int, default=None, help="training seed (default: the organism's recipe seed)")
    train.add_argument("--steps", type=int, default=None, help="training steps (default: the organism's recipe)")
    train.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    train.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                       help="stop after this wall time (cosine schedule over the budget; the steps taken are recorded)")
    train.add_argument("--eval-n", type=int, default=200, help="held-out examples per task measured after training")
    train.set_defaults(organisms_handler=cmd_train)
    ev = sub.add_parser("eval", help="accuracy per task (95%% Wilson CI) on freshly generated held-out data")
    ev.add_argument("name", choices=names)
    ev.add_argument("--model-dir", default=None, help="checkpoint folder (default: the shipped checkpoint)")
    ev.add_argument("-n", type=int, default=200, help="held-out examples per task (default: %(default)s)")
    ev.add_argument("--seed", type=int, default=None, help="generator seed of the held-out data (default: the evaluation seed)")
    ev.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ev.set_defaults(organisms_handler=cmd_eval)
    ls = sub.add_parser("list", help="organisms, their architecture, whether trained, and their measured accuracy")
    ls.set_defaults(organisms_handler=cmd_list)


def cmd_train(args: argparse.Namespace, stdout: TextIO) -> int:
    import torch

    from hooked_vlm.organisms import checkpoint_dir, get_organism
    from hooked_vlm.organisms.base import accuracy_table

    if args.threads:
        torch.set_num_threads(args.threads)
    organism = get_organism(args.name)
    out = args.out or checkpoint_dir(args.name)
    kwargs = {"time_budget_s": args.time_budget} if args.time_budget else {}
    seed = organism.recipe_seed if args.seed is None else args.seed
    result = organism.train(out, seed=seed, steps=args.steps, eval_n=args.eval_n, **kwargs)
    print(f"{args.name}: {result.steps} steps in {result.seconds:.1f} s; saved to {out}", file=stdout)
    if result.accuracy:
        print(accuracy_table(result.accuracy), file=stdout)
    return 0


def cmd_eval(args: argparse.Namespace, stdout: TextIO) -> int:
    from hooked_vlm.organisms import checkpoint_dir, get_organism, is_trained
    from hooked_vlm.organisms.base import EVAL_SEED, accuracy_table

    if args.model_dir is None and not is_trained(args.name):
        raise FileNotFoundError(f"{args.name} has no shipped checkpoint; train it with `hooked-vlm organisms train {args.name}`")
    organism = get_organism(args.name)
    acc = organism.evaluate(args.model_dir or checkpoint_dir(args.name), n=args.n, seed=EVAL_SEED if args.seed is None else args.seed)
    if args.json:
        print(json.dumps({k: v.to_dict() for k, v in acc.items()}, indent=2), file=stdout)
    else:
        print(accuracy_table(acc), file=stdout)
    return 0


def organism_rows() -> list[list[str]]:
    """One row per organism: name, architecture, trained or not, accuracy per task (from organism.json)."""
    from hooked_vlm.organisms import ORGANISMS, checkpoint_dir, is_trained
    from hooked_vlm.organisms.base import read_metadata

    rows = []
    for name in ORGANISMS:
        meta = read_metadata(checkpoint_dir(name)) if is_trained(name) else {}
        acc = meta.get("accuracy", {})
        text = ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in acc.items()) if acc else ("-" if meta else "not trained")
        rows.append([name, meta.get("architecture", "-"), "yes" if is_trained(name) else "no", text])
    return rows


def cmd_list(args: argparse.Namespace, stdout: TextIO) -> int:
    print(_format_table(["organism", "architecture", "shipped", "held-out accuracy"], organism_rows()), file=stdout)
    return 0


def _format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Aligned plain-text columns."""
    cells = [headers] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None, stdout: TextIO | None = None) -> int:
    """``python -m hooked_vlm.organisms.cli ...`` (same commands as ``hooked-vlm organisms ...``)."""
    parser = argparse.ArgumentParser(prog="hooked-vlm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args, stdout or sys.stdout)
