"""The shared case runner of the research pipelines (visual search, spatial relations, ...).

A pipeline is a :class:`Schema` (what one case of its dataset holds), a model loader and a per-case
function; :func:`run_pipeline` does the rest: checked dataset reading, per-case resumable results,
failures recorded, progress, a run manifest, optional Ray workers. See docs/pipelines.md.
"""

from analyses.pipelines.cli_args import add_common_args, config_from_args
from analyses.pipelines.datasets import Case, CaseError, Dataset, DatasetError, Field, InvalidCase, Schema, read_dataset
from analyses.pipelines.html_index import Section, write_index_html
from analyses.pipelines.provenance import atomic_output, atomic_write_json, model_fingerprint, package_versions
from analyses.pipelines.runner import (
    CaseContext, CaseFailedError, ModelSpec, Pipeline, RunConfig, RunSummary, case_seed, load_failures,
    load_hooked_model, load_results, run_pipeline,
)

__all__ = [
    "Case", "CaseContext", "CaseError", "CaseFailedError", "Dataset", "DatasetError", "Field", "InvalidCase",
    "ModelSpec", "Pipeline", "RunConfig", "RunSummary", "Schema", "Section", "add_common_args", "atomic_output",
    "atomic_write_json", "case_seed", "config_from_args", "load_failures", "load_hooked_model", "load_results",
    "model_fingerprint", "package_versions", "read_dataset", "run_pipeline", "write_index_html",
]
