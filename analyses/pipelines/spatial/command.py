"""``hooked-vlm spatial``: which image regions a relation word reads, which layers carry the relation, and whether
scaling attention on image tokens fixes errors.

Per case: the model's answer (QA option, or the most likely of the what's-up captions), attention from the relation
phrase and the answer token to the image per layer, activation patching from the image into its mirrored
counterpart (a known answer flip) per layer and position group, the last token's residual stream for probes, and
accuracy with the image-key attention logits scaled by each factor (and by a confidence-gated factor). Reports:
accuracy per relation / pair / set, attention per layer, patching, probes per layer, AdaptVis accuracy per factor.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from analyses.pipelines.cli_args import add_common_args, config_from_args
from analyses.pipelines.datasets import Case
from analyses.pipelines.runner import CaseContext, Pipeline, run_pipeline
from analyses.pipelines.spatial.data import SCHEMA, make_dataset

__all__ = ["SPATIAL", "add_arguments", "run", "description"]

DEFAULT_DATA = "data/spatial.jsonl"
description = __doc__


def _run_case(loaded: Any, case: Case, ctx: CaseContext) -> dict[str, Any]:
    from analyses.pipelines.spatial.case import run_case

    return run_case(loaded, case, ctx)


SPATIAL = Pipeline(name="spatial", schema=SCHEMA, run_case=_run_case, version="1")


def _factor(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a scaling factor must be > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's own options, then the options every pipeline shares."""
    parser.add_argument("data", nargs="?", default=None, help="what's-up JSON list (caption_options) or QA JSONL / JSON")
    parser.add_argument("--make-data", nargs=2, metavar=("N", "DIR"), default=None,
                        help="generate N images (mirrored pairs) from the organism's relation task into DIR, then run on them")
    parser.add_argument("--form", choices=("qa", "captions"), default="qa", help="form of generated data (default: qa)")
    parser.add_argument("--template", default="{question} <image>", help="QA prompt; {question}, <image> (default: '{question} <image>')")
    parser.add_argument("--caption-template", default="<image> {caption}", help="caption prompt (default: '<image> {caption}')")
    parser.add_argument("--adapt-factors", type=_factor, nargs="+", default=[0.5, 2.0],
                        help="factors on the image-key attention logits (default: 0.5 2.0)")
    parser.add_argument("--adapt-layers", type=int, nargs="+", default=None, help="layers to scale (default: all)")
    parser.add_argument("--gate-threshold", type=float, default=0.6, help="confidence below which the gated factor is --gate-low")
    parser.add_argument("--gate-low", type=_factor, default=0.5, help="gated factor for unconfident answers (default: 0.5)")
    parser.add_argument("--gate-high", type=_factor, default=1.5, help="gated factor for confident answers (default: 1.5)")
    parser.add_argument("--figures", type=int, default=6, help="per-case heatmaps to draw (default: 6)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default: 1, fastest for small models; raise it for large checkpoints)")
    add_common_args(parser, default_model="grid-qwen2.5-vl", default_output_dir="reports/spatial")


def _dataset(args: argparse.Namespace, stdout: TextIO) -> Path:
    if args.make_data is not None:
        n_text, folder = args.make_data
        try:
            n = int(n_text)
        except ValueError:
            raise ValueError(f"--make-data N DIR: N must be a number of images, got {n_text!r}") from None
        if args.data is not None:
            raise ValueError(f"pass either a dataset ({args.data}) or --make-data, not both")
        path = make_dataset(folder, n, seed=args.seed, form=args.form)
        print(f"generated {n} images and {path}", file=stdout)
        return path
    return Path(args.data or DEFAULT_DATA)


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's own settings (stored with the results: resuming with others is refused)."""
    for name, template, key in (("--template", args.template, "{question}"), ("--caption-template", args.caption_template, "{caption}")):
        if key not in template or "<image>" not in template:
            raise ValueError(f"{name} {template!r} must contain {key} and <image>")
    return {"template": args.template, "caption_template": args.caption_template, "adapt_factors": list(args.adapt_factors),
            "adapt_layers": args.adapt_layers, "gate_threshold": args.gate_threshold, "gate_low": args.gate_low,
            "gate_high": args.gate_high, "seed": args.seed}


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    """Generate (optionally) the dataset, run the cases, then write the reports."""
    from analyses.pipelines.spatial.report import write_reports

    options = options_from_args(args)
    data = _dataset(args, stdout)
    config = config_from_args(args, **options)
    config.threads = args.threads
    summary = run_pipeline(SPATIAL, data, args.output_dir, config, argv=getattr(args, "argv", sys.argv))
    report = write_reports(args.output_dir, options, summary.manifest, max_figures=args.figures)
    print(f"cases: {summary.counts}", file=stdout)
    for row in report["accuracy"]:
        print(f"  accuracy {row['kind']} {row['scope']}: {row['accuracy']:.3f} (n={row['n']})", file=stdout)
    for row in report["adaptvis"]:
        print(f"  attention scaling {row['setting']}: accuracy {row['accuracy']:.3f}", file=stdout)
    print(f"reports in {Path(args.output_dir) / 'index.html'}", file=stdout)
    return 0
