"""``hooked-vlm video {infer,trace,probe,mean-vector,check-indexing}``: the video-QA study as commands.

Flags follow the original scripts (``--annotations``, ``--video_root``, ``--output``, ``--num_frames``,
``--token_slice``, ``--swap_spans``, ...; dashed spellings work too) plus the shared pipeline flags
(``--model``, ``--workers``, ``--resume`` / ``--overwrite``, ...). infer and trace run on the shared case
runner: the run folder (``--output-dir``, default: ``--output`` without its suffix) holds the manifest,
the per-entry results (resumable), figures and ``index.html``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, TextIO

from hooked_vlm.cli import Command

__all__ = ["VIDEO"]

DEFAULT_MODEL = "video-qwen2-vl"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _data_args(p: argparse.ArgumentParser, command: str) -> None:
    from analyses.pipelines.cli_args import add_common_args

    from .clips import DEFAULT_TEMPLATE

    p.add_argument("--annotations", help="JSON list (or JSONL / CSV) of entries {video_name, question, candidates, answer, ...}")
    p.add_argument("--video_root", "--video-root", dest="video_root", help="folder the video_name paths are relative to (default: the annotations' folder)")
    p.add_argument("--output", default=f"reports/video_{command}.json", help="results JSON (default: %(default)s)")
    p.add_argument("--num_frames", "--num-frames", dest="num_frames", type=_positive_int, default=None,
                   help="sample this many frames uniformly from each clip (after --fps and start / end)")
    p.add_argument("--fps", type=_positive_float, default=None, help="sample clips at this frame rate first (default: every frame)")
    p.add_argument("--folder_fps", "--folder-fps", dest="folder_fps", type=_positive_float, default=2.0,
                   help="frame rate of frame folders, which carry no clock (default: %(default)s)")
    p.add_argument("--prompt_template", "--prompt-template", dest="prompt_template", default=DEFAULT_TEMPLATE,
                   help="prompt; <video> marks the clip, {question} and {candidates} are filled in (default: %(default)r)")
    p.add_argument("--make-data", "--make_data", dest="make_data", nargs=2, metavar=("N", "DIR"), default=None,
                   help="first write N clips of the video organism as DIR/videos/*.mp4 + DIR/annotations.json (used when "
                   "--annotations is not given)")
    p.add_argument("--model_id", dest="model", default=argparse.SUPPRESS, help="alias of --model")
    add_common_args(p, default_model=DEFAULT_MODEL, default_output_dir="--output without its suffix")
    p.set_defaults(output_dir=None)


def _add_infer(p: argparse.ArgumentParser) -> None:
    _data_args(p, "infer")
    p.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=_positive_int, default=8,
                   help="greedy answer length limit (default: %(default)s)")


def _add_trace(p: argparse.ArgumentParser) -> None:
    from .counterfactual_set import COUNTERFACTUALS, DEFAULT_COUNTERFACTUALS

    _data_args(p, "trace")
    p.add_argument("--token_slice", "--token-slice", dest="token_slice", action="append", default=[],
                   help="extra token slice to patch: visual, text or visual_frames:A:B (input frames A..B-1); repeatable. "
                   "visual, text and every temporal slice are always traced")
    p.add_argument("--swap_spans", "--swap-spans", dest="swap_spans", default="0:2,2:4",
                   help="span pairs for the swap counterfactual, in input frames (default: %(default)s)")
    p.add_argument("--counterfactuals", default=",".join(DEFAULT_COUNTERFACTUALS),
                   help=f"comma-separated, from {', '.join(COUNTERFACTUALS)} (default: %(default)s)")
    p.add_argument("--include_motion_only", "--include-motion-only", dest="include_motion_only", action="store_true",
                   help="add the motion-only counterfactual")
    p.add_argument("--dump_representations", "--dump-representations", dest="dump_representations", action="store_true",
                   help="save per-layer residual summaries (layers_mean, last_token, frames_mean) of every run for the probes")
    p.add_argument("--representations_output", "--representations-output", dest="representations_output", default=None,
                   help="where the representations go (.npz, or .json as the original scripts; default: OUTPUT_representations.npz)")
    p.add_argument("--batch_size", "--batch-size", dest="batch_size", type=_positive_int, default=8,
                   help="patched forwards per batch (lower it for long clips; default: %(default)s)")


def _add_probe(p: argparse.ArgumentParser) -> None:
    from .representations import KINDS

    p.add_argument("--tracing_results", "--tracing-results", dest="tracing_results", required=True, help="--output JSON of `video trace`")
    p.add_argument("--representations", required=True, help="--representations_output of `video trace --dump_representations`")
    p.add_argument("--probe_type", "--probe-type", dest="probe_type", choices=("have1", "have2"), default="have1")
    p.add_argument("--representation", choices=KINDS, default="layers_mean")
    p.add_argument("--layer_idx", "--layer-idx", dest="layer_idx", type=int, default=None, help="one layer (default: every layer)")
    p.add_argument("--annotations", default=None, help="annotation file (have2: the labels)")
    p.add_argument("--label_key", "--label-key", dest="label_key", default=None, help="have2: the annotation field to predict")
    p.add_argument("--output", default="reports/video_probe.json", help="metrics JSON (and a CSV beside it; default: %(default)s)")
    p.add_argument("--n_splits", "--n-splits", dest="n_splits", type=_positive_int, default=5, help="grouped CV folds (default: %(default)s)")
    p.add_argument("--n_resamples", "--n-resamples", dest="n_resamples", type=_positive_int, default=499, help="bootstrap resamples for CIs")
    p.add_argument("--seed", type=int, default=0)


def _add_mean_vector(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="folder of cached activation files (*.safetensors, *.pt)")
    p.add_argument("--output", default=None, help="where to write the mean (default: DIR/mean_vector.pt)")
    p.add_argument("--device", default="cpu", help="device to accumulate on (default: cpu)")


def _add_check_indexing(p: argparse.ArgumentParser) -> None:
    from .check_indexing import DEFAULT_MODELS

    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names or folders (default: %(default)s)")
    p.add_argument("--output", default=None, help="also write the rows as JSON here")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The five subcommands and their flags."""
    sub = parser.add_subparsers(dest="video_command", required=True, metavar="STEP")
    for name, adder, text in (
        ("infer", _add_infer, "answer each entry's question; the chosen candidate; accuracy per task"),
        ("trace", _add_trace, "counterfactual causal tracing per layer and token slice; recovery maps"),
        ("probe", _add_probe, "Have-1 / Have-2 probes on dumped representations (grouped splits, AUROC with CIs)"),
        ("mean-vector", _add_mean_vector, "mean vector of cached activation tensors, streamed"),
        ("check-indexing", _add_check_indexing, "check that frame spans land on the right tokens, per video family"),
    ):
        adder(sub.add_parser(name, help=text, description=text))


# ------------------------------------------------------------------------------------------ runs
def _prepare_data(args: argparse.Namespace) -> tuple[Path, Path]:
    """(annotations file, video root) after --make-data; errors name the missing flag."""
    from .annotations import make_data

    if args.make_data:
        n_text, folder = args.make_data
        try:
            n = int(n_text)
        except ValueError:
            raise ValueError(f"--make-data N DIR: N must be a number of clips, got {n_text!r}") from None
        written = make_data(n, folder, seed=args.seed)
        if not args.annotations:
            args.annotations = str(written)
            args.video_root = args.video_root or str(folder)
    if not args.annotations:
        raise ValueError("give --annotations FILE (or --make-data N DIR to generate the organism's clips)")
    annotations = Path(args.annotations)
    return annotations, Path(args.video_root) if args.video_root else annotations.parent


def _run(pipeline: Any, args: argparse.Namespace, options: dict[str, Any]) -> tuple[Any, Path, Path]:
    from analyses.pipelines.cli_args import config_from_args
    from analyses.pipelines.runner import run_pipeline

    from .clips import clip_options

    annotations, root = _prepare_data(args)
    args.video_root = str(root)
    output = Path(args.output)
    run_dir = Path(args.output_dir) if args.output_dir else output.with_suffix("")
    config = config_from_args(args, **clip_options(args), **options)
    summary = run_pipeline(pipeline, annotations, run_dir, config, argv=["hooked-vlm", "video", *getattr(args, "argv", [])[1:]])
    return summary, output, run_dir


def _run_infer(args: argparse.Namespace, stdout: TextIO) -> int:
    from .infer import INFER, write_outputs

    summary, output, run_dir = _run(INFER, args, {"max_new_tokens": args.max_new_tokens})
    result = write_outputs(summary.results(), summary.failures(), output, run_dir, summary.manifest)
    print(f"video infer: {summary.counts}", file=stdout)
    for row in result["accuracy"]:
        print(f"  {row['task_name']:<12} accuracy {row['accuracy']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] (n={row['n']})", file=stdout)
    print(f"results {output}  report {run_dir / 'index.html'}", file=stdout)
    return 0


def _run_trace(args: argparse.Namespace, stdout: TextIO) -> int:
    from .counterfactual_set import COUNTERFACTUALS, check_swap_spans
    from .representations import assemble
    from .spans import parse_span_list, parse_token_slice
    from .trace import TRACE, representation_file
    from .trace_report import write_trace_outputs

    names = [n.strip() for n in args.counterfactuals.split(",") if n.strip()]
    unknown = [n for n in names if n not in COUNTERFACTUALS]
    if unknown or not names:
        raise ValueError(f"--counterfactuals {args.counterfactuals!r}: unknown {unknown}; choose from {', '.join(COUNTERFACTUALS)}")
    if args.include_motion_only and "motion_only" not in names:
        names.append("motion_only")
    for text in args.token_slice:
        parse_token_slice(text)
    spans = parse_span_list(args.swap_spans)
    check_swap_spans(spans)
    options = {"token_slices": list(args.token_slice), "swap_spans": [list(s) for s in spans], "counterfactuals": names,
               "dump_representations": bool(args.dump_representations), "batch_size": args.batch_size}
    summary, output, run_dir = _run(TRACE, args, options)
    results, failures = summary.results(), summary.failures()
    result = write_trace_outputs(results, failures, output, run_dir, summary.manifest)
    print(f"video trace: {summary.counts}", file=stdout)
    if args.dump_representations:
        rep_out = Path(args.representations_output) if args.representations_output else output.with_name(output.stem + "_representations.npz")
        files = [(str(r["question_id"]), str(r["video_name"]), representation_file(run_dir.resolve(), r["case_id"])) for r in results.to_dict("records")]
        n = assemble(files, rep_out)
        print(f"representations {rep_out} ({n} rows)", file=stdout)
    print(f"results {output} (+ {output.with_suffix('.parquet').name})  report {run_dir / 'index.html'}", file=stdout)
    if result["failures"]:
        print(f"{len(result['failures'])} entr(ies) failed; see {output} 'failures' or {run_dir / 'index.html'}", file=stdout)
    return 0


def _run_probe(args: argparse.Namespace, stdout: TextIO) -> int:
    import pandas as pd

    from hooked_vlm.atomic_files import atomic_output, atomic_write_json

    from .probe import run_probe

    result = run_probe(args.tracing_results, args.representations, args.probe_type, args.representation, args.layer_idx,
                       args.annotations, args.label_key, args.n_splits, args.n_resamples, args.seed)
    output = Path(args.output)
    atomic_write_json(output, result, sort_keys=False)
    table = pd.DataFrame(result["layers"])
    with atomic_output(output.with_suffix(".csv")) as tmp:
        table.to_csv(tmp, index=False)
    print(f"video probe {args.probe_type} on {args.representation}: {result['n_samples']} samples from {result['n_videos']} videos", file=stdout)
    for row in result["layers"]:
        print(f"  layer {row['layer']:>3}  accuracy {row['accuracy']:.3f} [{row['accuracy_low']:.3f}, {row['accuracy_high']:.3f}]  "
              f"AUROC {row['auroc']:.3f} [{row['auroc_low']:.3f}, {row['auroc_high']:.3f}]  chance {row['chance']:.3f}", file=stdout)
    if result["skipped"]:
        print(f"  skipped {len(result['skipped'])} entr(ies): {result['skipped'][:3]}", file=stdout)
    print(f"results {output}", file=stdout)
    return 0


def _run_mean_vector(args: argparse.Namespace, stdout: TextIO) -> int:
    from .mean_vector import mean_vector

    summary = mean_vector(args.directory, args.output, args.device)
    for name, info in summary["vectors"].items():
        print(f"mean of {name}: {info['rows']} rows, width {info['width']}", file=stdout)
    for skip in summary["files_skipped"]:
        print(f"skipped {skip['file']}: {skip['error']}", file=stdout)
    print(f"wrote {summary['output']}", file=stdout)
    return 0


def _run_check_indexing(args: argparse.Namespace, stdout: TextIO) -> int:
    from hooked_vlm.atomic_files import atomic_write_json

    from .check_indexing import check_indexing

    rows = check_indexing([m.strip() for m in args.models.split(",") if m.strip()])
    for r in rows:
        print(f"{r['model']:<24} frames {r['span']:<5} -> slices {r['slices']} ({r['tokens_per_slice']} tokens each): "
              f"{r['n_positions']} positions [{r['first']}..{r['last']}], pixel change reached {r['n_changed']}: "
              f"{'ok' if r['match'] else 'MISMATCH'}", file=stdout)
    if args.output:
        atomic_write_json(args.output, rows, sort_keys=False)
    bad = [r for r in rows if not r["match"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} spans land on the right tokens", file=stdout)
    return 1 if bad else 0


RUNNERS = {"infer": _run_infer, "trace": _run_trace, "probe": _run_probe, "mean-vector": _run_mean_vector,
           "check-indexing": _run_check_indexing}


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    """Dispatch to the chosen step."""
    return RUNNERS[args.video_command](args, stdout)


VIDEO = Command(add_arguments, run, "The video-QA study: inference, counterfactual causal tracing, Have-1 / Have-2 probes, "
                "mean vectors and a token-indexing check, on the video organism by default or any video checkpoint.")
