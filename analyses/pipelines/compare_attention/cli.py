"""``hooked-vlm compare-attention``: two models, one CSV of paraphrased yes/no questions (docs/compare_attention.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

__all__ = ["add_arguments", "run", "description", "compare"]

description = ("Compare where two VLMs look when they answer the same yes/no questions about the same images (six paraphrases "
               "per study): answer-token attention, Grad-CAM and saliency maps, paraphrase robustness, statistics clustered by study.")
DEFAULT_MODELS = ("rad-llava", "rad-gemma3")
TEMPLATE = "user : <image> {question} assistant :"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from analyses.pipelines.cli_args import add_common_args

    parser.add_argument("--csv", default=None, help="CSV with study_id, image_path, finding, variant_id (0-5), question, answer_gt "
                        "(yes/no) and optional finding_box / marker_box ('x0 y0 x1 y1')")
    parser.add_argument("--models", nargs=2, default=list(DEFAULT_MODELS), metavar=("A", "B"),
                        help="two models: organism / tiny names or checkpoint folders (default: rad-llava rad-gemma3)")
    parser.add_argument("--make-data", action="store_true", help="generate the CSV and images with the radiograph organisms' generator "
                        "(six paraphrases per study) into OUTPUT/data and use it")
    parser.add_argument("--studies", type=int, default=24, help="studies --make-data draws (default: 24; about a third carry the marker)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of --make-data")
    parser.add_argument("--head-fusion", choices=["mean", "max", "entropy"], default="mean", help="attention heads fused by (default: mean)")
    parser.add_argument("--methods", nargs="+", choices=["attention", "gradcam", "saliency"], default=["attention", "gradcam", "saliency"],
                        help="maps per row: answer-token attention, Grad-CAM, gradient saliency (default: all three)")
    parser.add_argument("--prompt-template", default=TEMPLATE, help=f"prompt with <image> and {{question}} (default: {TEMPLATE!r})")
    parser.add_argument("--answer-words", nargs=2, default=["yes", "no"], metavar=("YES", "NO"), help="the two answer tokens")
    parser.add_argument("--max-figures", type=int, default=4, help="studies drawn in the figures (default: 4)")
    parser.add_argument("--n-resamples", type=int, default=1999, help="bootstrap resamples of every CI (default: 1999)")
    add_common_args(parser, default_model=DEFAULT_MODELS[0], default_output_dir="compare_attention")
    for action in parser._actions:  # the models come from --models; the shared --model flag does not apply here
        if action.dest == "model":
            action.help = argparse.SUPPRESS


def compare(csv: str | Path, models: list[str], output_dir: str | Path, config: Any, methods: list[str], max_figures: int = 4,
            argv: list[str] | None = None) -> dict[str, Any]:
    """Run every model on the CSV (resumable, one runner folder each under OUTPUT/models/) and write the comparison."""
    from analyses.pipelines import load_failures, run_pipeline
    from analyses.pipelines.compare_attention.data import study_problems
    from analyses.pipelines.compare_attention.pipeline import COMPARE
    from analyses.pipelines.compare_attention.report import write_report

    if len(models) != 2 or models[0] == models[1]:
        raise ValueError(f"--models needs two different models, got {models}")
    out = Path(output_dir)
    per_model, manifests, failures = {}, {}, []
    for name in models:
        config.model = name
        folder = out / "models" / _slug(name)
        summary = run_pipeline(COMPARE, csv, folder, config, argv=argv)
        results = summary.results()
        if len(results) == 0:
            raise ValueError(f"{name}: no row of {csv} could be run; see {folder / 'failures'}")
        per_model[name], manifests[name] = results, summary.manifest
        failures.append(load_failures(folder).assign(model=name))
    fails = [f for f in failures if len(f)]
    import pandas as pd

    failed = pd.concat(fails, ignore_index=True) if fails else pd.DataFrame(columns=["model", "case_id", "source", "error_type", "message"])
    return write_report(out, per_model, methods, failed[[c for c in ["model", "case_id", "source", "stage", "error_type", "message"] if c in failed]],
                        study_problems(csv), manifests, max_figures, seed=config.seed,
                        n_resamples=int(config.options.get("n_resamples", 1999)))


def _slug(name: str) -> str:
    return Path(name).name.replace(" ", "_") if Path(name).exists() else name.replace("/", "_")


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    from analyses.pipelines.cli_args import config_from_args
    from analyses.pipelines.compare_attention.data import make_data

    if args.make_data == (args.csv is not None):
        raise ValueError("give --csv FILE, or --make-data to generate one (not both)")
    if "<image>" not in args.prompt_template or "{question}" not in args.prompt_template:
        raise ValueError(f"--prompt-template must hold <image> and {{question}}, got {args.prompt_template!r}")
    csv = args.csv or make_data(Path(args.output_dir) / "data", args.studies, args.data_seed)
    config = config_from_args(args, methods=list(args.methods), head_fusion=args.head_fusion, prompt_template=args.prompt_template,
                              answer_words=list(args.answer_words), n_resamples=args.n_resamples)
    summary = compare(csv, list(args.models), args.output_dir, config, list(args.methods), args.max_figures,
                      argv=getattr(args, "argv", sys.argv))
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for model, s in summary["models"].items():
        acc = s["accuracy"]
        ratios = ", ".join(f"{m} {num(v.get('estimate'))}" for m, v in s["marker_ratio"].items() if v)
        print(f"{model}: accuracy {num(acc.get('estimate'))} [{num(acc.get('low'))}, {num(acc.get('high'))}] over {s['rows']} rows; "
              f"marker box ratio {ratios or 'n/a (no marked study)'}", file=stdout)
    print(f"report: {Path(args.output_dir) / 'index.html'} ({len(summary['failures'])} failed rows, "
          f"{len(summary['study_problems'])} study problems)", file=stdout)
    return 0
