"""The command-line flags every pipeline command shares, and the :class:`RunConfig` they describe."""

from __future__ import annotations

import argparse
from typing import Any

from analyses.pipelines.provenance import DTYPES
from analyses.pipelines.runner import RunConfig

__all__ = ["add_common_args", "config_from_args"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def add_common_args(parser: argparse.ArgumentParser, default_model: str | None = None, default_output_dir: str = "reports") -> argparse.ArgumentParser:
    """Add --model, --limit, --device, --dtype, --seed, --workers, --ray-address, --output-dir, --strict, --resume/--overwrite."""
    group = parser.add_argument_group("run options (shared by every pipeline)")
    group.add_argument("--model", default=default_model, required=default_model is None,
                       help="built-in tiny model / organism name, or a checkpoint folder (config.json + *.safetensors)"
                       + (f" (default: {default_model})" if default_model else ""))
    group.add_argument("--limit", type=_positive_int, default=None, help="run only the first N cases of the dataset")
    group.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    group.add_argument("--dtype", default="float32", choices=sorted(set(DTYPES)), help="model weights dtype (default: float32)")
    group.add_argument("--seed", type=int, default=0, help="run seed; each case's seed is derived from it and the case id (default: 0)")
    group.add_argument("--workers", type=_non_negative_int, default=0,
                       help="run cases on N Ray workers (a local Ray on 127.0.0.1, needs hooked-vlm[ray]); 0 = in this process")
    group.add_argument("--ray-address", default=None, help="run on an existing Ray cluster (e.g. ray://host:10001 or auto)")
    group.add_argument("--output-dir", default=default_output_dir, help=f"folder for results, manifest and reports (default: {default_output_dir})")
    group.add_argument("--strict", action="store_true", help="stop at the first bad or failing case instead of recording it and going on")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--resume", dest="overwrite", action="store_false",
                      help="keep finished cases in --output-dir and compute only the rest (default)")
    mode.add_argument("--overwrite", dest="overwrite", action="store_true",
                      help="discard results already in --output-dir and start over")
    group.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.set_defaults(overwrite=False, progress=True)
    return parser


def config_from_args(args: argparse.Namespace, **options: Any) -> RunConfig:
    """The :class:`RunConfig` of parsed common flags; ``options`` are the pipeline's own settings."""
    return RunConfig(
        model=args.model, device=args.device, dtype=args.dtype, seed=args.seed, limit=args.limit,
        workers=args.workers, ray_address=args.ray_address, strict=args.strict, overwrite=args.overwrite,
        progress=args.progress, options=options,
    )
