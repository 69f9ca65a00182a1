"""``hooked-vlm spatial``: relation accuracy, relation-word attention, mirror patching, probes, AdaptVis scaling.

See docs/spatial.md. :data:`SPATIAL` is the pipeline, :func:`write_reports` writes a run folder's reports,
:func:`make_dataset` generates mirrored relation pairs, :func:`key_scaling_hooks` is the attention scaling.
"""

from analyses.pipelines.spatial.adaptvis import gated_factor, key_scaling_hooks
from analyses.pipelines.spatial.command import SPATIAL
from analyses.pipelines.spatial.data import SCHEMA, make_dataset
from analyses.pipelines.spatial.report import write_reports

__all__ = ["SCHEMA", "SPATIAL", "gated_factor", "key_scaling_hooks", "make_dataset", "write_reports"]
