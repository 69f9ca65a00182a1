"""A self-contained ``index.html`` for a pipeline run: text, tables and linked figures; no scripts, no CDN."""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from analyses.pipelines.provenance import atomic_output

__all__ = ["Section", "write_index_html"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
figure { display: inline-block; margin: 0.5em; text-align: center; }
figure img { max-width: 22em; border: 1px solid #ddd; }
.meta { color: #666; font-size: 0.85em; }
"""


@dataclass
class Section:
    """One heading with a paragraph, tables (DataFrames or (headers, rows)), figures and links (paths)."""

    heading: str
    text: str = ""
    tables: Sequence[pd.DataFrame | tuple[Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    figures: Sequence[str | os.PathLike] = field(default_factory=list)
    links: Sequence[str | os.PathLike] = field(default_factory=list)
    max_rows: int = 50


def _href(path: str | os.PathLike, base: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        p = Path(os.path.relpath(p, base))
    return html.escape(p.as_posix(), quote=True)


def _table(table: pd.DataFrame | tuple[Sequence[str], Sequence[Sequence[Any]]], max_rows: int) -> str:
    frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(list(table[1]), columns=list(table[0]))
    note = f"<p class='meta'>first {max_rows} of {len(frame)} rows</p>" if len(frame) > max_rows else ""
    return frame.head(max_rows).to_html(index=False, escape=True, border=0, float_format=lambda x: f"{x:.4g}") + note


def write_index_html(path: str | os.PathLike, title: str, sections: Sequence[Section], manifest: Mapping[str, Any] | None = None) -> Path:
    """Write ``path`` (atomically): a title, the run's key facts from ``manifest``, then each section.

    Figures and links are written relative to the index's folder, so the run folder can be moved or zipped.
    """
    target = Path(path)
    base = target.parent
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if manifest:
        facts = {k: manifest.get(k) for k in ("pipeline", "status", "started_at", "finished_at", "elapsed_s")}
        model = manifest.get("model") or {}
        facts["model"] = f"{model.get('name')} ({model.get('dtype')}, {model.get('device')}, fingerprint {model.get('fingerprint')})"
        facts.update({f"cases {k}": v for k, v in (manifest.get("counts") or {}).items()})
        rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items() if v is not None)
        parts.append(f"<table class='meta'>{rows}</table>")
    for s in sections:
        parts.append(f"<h2>{html.escape(s.heading)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        parts.extend(_table(t, s.max_rows) for t in s.tables)
        for fig in s.figures:
            href = _href(fig, base)
            parts.append(f"<figure><a href='{href}'><img src='{href}' alt='{href}'></a><figcaption>{html.escape(Path(fig).name)}</figcaption></figure>")
        if s.links:
            items = "".join(f"<li><a href='{_href(p, base)}'>{html.escape(Path(p).name)}</a></li>" for p in s.links)
            parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>\n")
    with atomic_output(target) as tmp:
        tmp.write_text("\n".join(parts), encoding="utf-8")
    return target
