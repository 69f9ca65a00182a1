"""``hooked-vlm visual-search``: where does a VLM look when it finds or misses a target on a grid image?

Stages: (2) presence answer per case for every prompt template (TP / FP / FN / TN, precision / recall with CIs,
flip rate); (3) the answer token's attention to the image per layer and head on the dataset's grid, from the
attention-statistics kernels, cached per case; (4) per-head map features and heads / layers ranked by TP vs FN
differences. With no dataset (or ``--make-data N DIR``) a dataset is generated with the organism's generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from analyses.pipelines.cli_args import add_common_args, config_from_args
from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext, Pipeline, run_pipeline
from analyses.pipelines.visual_search.data import SCHEMA, make_dataset

__all__ = ["VISUAL_SEARCH", "DEFAULT_TEMPLATES", "add_arguments", "run", "description"]

DEFAULT_TEMPLATES = ("is there a {query} ? <image>", "is a {query} there ? <image>", "<image> is there a {query} ?")
DEFAULT_DATA = "data/annotations.jsonl"
description = __doc__


def _run_case(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    from analyses.pipelines.visual_search.case import run_case

    return run_case(loaded, case, ctx)


VISUAL_SEARCH = Pipeline(name="visual-search", schema=SCHEMA, run_case=_run_case, version="1")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's own options, then the options every pipeline shares."""
    parser.add_argument("data", nargs="?", default=None,
                        help=f"annotations.jsonl (default: {DEFAULT_DATA}, generated with --make-data's size when missing)")
    parser.add_argument("--make-data", nargs=2, metavar=("N", "DIR"), default=None,
                        help="generate N images + DIR/annotations.jsonl with the organism's generator, then run on it")
    parser.add_argument("--grid", type=int, default=10, help="cells per side of generated images (default: 10)")
    parser.add_argument("--patch", type=int, default=28, help="pixels per cell of generated images (default: 28)")
    parser.add_argument("--query", default=None, help="target for lines without a 'query' field, e.g. 'green circle'")
    parser.add_argument("--template", dest="templates", action="append", default=None,
                        help="prompt template with {query} and <image> (repeatable; the first is the main one; default: "
                        + " | ".join(DEFAULT_TEMPLATES) + ")")
    parser.add_argument("--answers", nargs=2, default=["yes", "no"], metavar=("YES", "NO"),
                        help="the yes / no answer words (single tokens; default: yes no)")
    parser.add_argument("--figures", type=int, default=12, help="per-case heatmaps to draw, TP and FN first (default: 12)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default: 1, fastest for small models; raise it for large checkpoints)")
    add_common_args(parser, default_model="grid-qwen2.5-vl", default_output_dir="reports")


def _dataset(args: argparse.Namespace, stdout: TextIO) -> Path:
    if args.make_data is not None:
        n_text, folder = args.make_data
        try:
            n = int(n_text)
        except ValueError:
            raise ValueError(f"--make-data N DIR: N must be a number of images, got {n_text!r}") from None
        path = make_dataset(folder, n, seed=args.seed, grid=args.grid, patch=args.patch)
        print(f"generated {n} images and {path}", file=stdout)
        if args.data is not None and Path(args.data).resolve() != path.resolve():
            raise ValueError(f"pass either a dataset ({args.data}) or --make-data, not both")
        return path
    return Path(args.data or DEFAULT_DATA)


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    """Generate (optionally) the dataset, run the cases, then write the reports."""
    from analyses.pipelines.visual_search.report import write_reports

    templates = list(args.templates or DEFAULT_TEMPLATES)
    for t in templates:
        if "{query}" not in t or "<image>" not in t:
            raise ValueError(f"--template {t!r} must contain {{query}} and <image>")
    data = _dataset(args, stdout)
    config = config_from_args(args, query=args.query, templates=templates, answers=list(args.answers))
    config.threads = args.threads
    summary = run_pipeline(VISUAL_SEARCH, data, args.output_dir, config, argv=getattr(args, "argv", sys.argv))
    report = write_reports(args.output_dir, templates, summary.manifest, max_figures=args.figures)
    ev = report["evaluation"]
    print(f"cases: {summary.counts}", file=stdout)
    flips = report["prompt_sensitivity"].get("mean_flip_rate")
    print(f"accuracy {ev['accuracy']['value']:.3f}  confusion {ev['confusion']}  mean flip rate "
          f"{'n/a' if flips is None else f'{flips:.3f}'}", file=stdout)
    for comparison, rows in report["top_heads"].items():
        for row in rows[:3]:
            print(f"  {comparison}: layer {row['layer']} head {row['head']} {row['feature']}: rank-biserial "
                  f"{row['rank_biserial']:+.2f} q={row['q_bh']:.3g}", file=stdout)
    for note in report["ranking_notes"]:
        print(f"  {note}", file=stdout)
    print(f"reports in {Path(args.output_dir) / 'index.html'}", file=stdout)
    return 0
