"""``hooked-vlm cir build-db`` and ``hooked-vlm cir query``: composed image retrieval with explanations (docs/cir.md)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

__all__ = ["add_arguments", "run", "description"]

description = ("Composed image retrieval (SEARLE): build an embedding database of an image folder, then query it with a reference "
               "image and a relative caption, explained by Grad-ECLIP / gradient x activation maps.")
DEFAULT_MODEL = "shapes-clip"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``build-db`` and ``query`` subcommands."""
    from analyses.pipelines.cli_args import add_common_args

    sub = parser.add_subparsers(dest="cir_command", required=True)
    build = sub.add_parser("build-db", help="embed an image folder into a database file (resumable)")
    build.add_argument("--images", required=True, help="image folder (searched recursively)")
    build.add_argument("--database", required=True, help="database file to write (safetensors)")
    build.add_argument("--make-data", action="store_true",
                       help="first write the shapes-clip organism's database images (one per colour x shape x place) into --images")
    add_common_args(build, default_model=DEFAULT_MODEL, default_output_dir="")
    build.set_defaults(cir_handler=_build)
    query = sub.add_parser("query", help="retrieve with a reference image + caption and explain the results")
    query.add_argument("--database", required=True, help="database file written by cir build-db")
    query.add_argument("--dataset-path", required=True, help="the image folder the database was built from")
    query.add_argument("--reference-image", default=None, help="the reference image (one query)")
    query.add_argument("--caption", default=None, help="the relative caption, e.g. 'is blue' (query: 'a photo of $ that is blue')")
    query.add_argument("--queries", default=None, help="JSONL / JSON / CSV of queries (id, reference_image, caption) instead of one")
    query.add_argument("--top-k", type=int, default=10, help="results to return (default: 10)")
    query.add_argument("--phi", default=None, help="phi checkpoint folder (default: the one shipped beside the model)")
    query.add_argument("--pseudo-token", default=None, help="vocabulary token that carries the pseudo-word (default: <$> or $)")
    query.add_argument("--generate-saliency", action="store_true", help="write the four explanations of each query")
    query.add_argument("--max-candidate-saliency", type=int, default=3, help="explain the top N results (default: 3)")
    query.add_argument("--generate-text-attribution", action="store_true", help="also draw the per-candidate text attributions")
    query.add_argument("--methods", nargs="+", default=["eclip", "gradxact"], choices=["eclip", "gradxact"],
                       help="saliency methods; the first writes the top-level file names (default: eclip gradxact)")
    query.add_argument("--save-saliency-dir", default=None, help="folder for maps and query.json (default: OUTPUT/saliency)")
    query.add_argument("--output-format", choices=["text", "json"], default="text")
    add_common_args(query, default_model=DEFAULT_MODEL, default_output_dir="")
    query.set_defaults(cir_handler=_query)


def run(args: argparse.Namespace, stdout: TextIO) -> int:
    return args.cir_handler(args, stdout)


def _build(args: argparse.Namespace, stdout: TextIO) -> int:
    from analyses.pipelines.cir.database import build_database, make_organism_images
    from analyses.pipelines.cli_args import config_from_args

    if args.make_data:
        make_organism_images(args.images)
    out = args.output_dir or str(Path(args.database).with_suffix("")) + "_run"
    summary = build_database(args.images, args.database, out, config_from_args(args), argv=getattr(args, "argv", sys.argv))
    print(f"database {args.database}: {summary.counts['done'] + summary.counts['skipped']} images embedded "
          f"({summary.counts['failed']} failed, see {out}/failures); run folder {out}", file=stdout)
    return 0


def _query(args: argparse.Namespace, stdout: TextIO) -> int:
    from analyses.pipelines import load_failures, run_pipeline
    from analyses.pipelines.cir.query import QUERY
    from analyses.pipelines.cli_args import config_from_args

    single = args.reference_image is not None or args.caption is not None
    if single == (args.queries is not None):
        raise ValueError("give either --reference-image and --caption (one query) or --queries FILE (many)")
    if single and (args.reference_image is None or args.caption is None):
        raise ValueError("a single query needs both --reference-image and --caption")
    if args.top_k < 1 or args.max_candidate_saliency < 1:
        raise ValueError("--top-k and --max-candidate-saliency must be >= 1")
    out = args.output_dir or (str(Path(args.save_saliency_dir)) + "_run" if args.save_saliency_dir else "cir_run")
    options = {"database": str(Path(args.database).resolve()), "dataset_path": str(Path(args.dataset_path).resolve()), "top_k": args.top_k,
               "phi": str(Path(args.phi).resolve()) if args.phi else None, "pseudo_token": args.pseudo_token,
               "generate_saliency": args.generate_saliency, "max_candidate_saliency": args.max_candidate_saliency,
               "generate_text_attribution": args.generate_text_attribution, "methods": list(args.methods),
               "save_saliency_dir": str(Path(args.save_saliency_dir).resolve()) if args.save_saliency_dir else None,
               "per_query_dirs": not single}
    config = config_from_args(args, **options)
    if single:
        dataset = [{"id": "query", "reference_image": str(Path(args.reference_image).resolve()), "caption": args.caption}]
        config.root = "/"
    else:
        dataset = args.queries
    summary = run_pipeline(QUERY, dataset, out, config, argv=getattr(args, "argv", sys.argv))
    failures = load_failures(out)
    if single and len(failures):
        raise ValueError(f"the query failed: {failures['error_type'].iloc[0]}: {failures['message'].iloc[0]}")
    results = summary.results()
    for _, row in results.iterrows():
        doc = json.loads(Path(row["json"]).read_text())
        if args.output_format == "json":
            print(json.dumps(doc, indent=2), file=stdout)
            continue
        q = doc["query"]
        print(f"query {q['id']}: {q['composed_text']!r} with {q['reference_image']}", file=stdout)
        for r in doc["results"]:
            print(f"  {r['rank']:>3}  {r['score']:.4f}  {r['file']}", file=stdout)
        print(f"  maps and query.json: {Path(row['json']).parent}", file=stdout)
    for _, f in failures.iterrows():
        print(f"failed {f['case_id']}: {f['error_type']}: {f['message']}", file=stdout)
    return 0
