"""``hooked-vlm visual-search``: presence answers, answer-token attention on the dataset's grid, TP-vs-FN head rankings.

See docs/visual_search.md. :data:`VISUAL_SEARCH` is the pipeline (runs on :func:`analyses.pipelines.run_pipeline`),
:func:`write_reports` writes the reports of a run folder, :func:`make_dataset` generates a dataset.
"""

from analyses.pipelines.visual_search.command import DEFAULT_TEMPLATES, VISUAL_SEARCH
from analyses.pipelines.visual_search.data import SCHEMA, make_dataset
from analyses.pipelines.visual_search.report import write_reports

__all__ = ["DEFAULT_TEMPLATES", "SCHEMA", "VISUAL_SEARCH", "make_dataset", "write_reports"]
