"""A self-contained HTML page for a logit lens: the image with its token grid; hover or click a cell (or a
prompt token) to see its lens tokens at every layer. No server, no CDN: the image is embedded as a
base64 PNG and the data as JSON in one file that opens from disk."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from analyses.logit_lens import LensResult

__all__ = ["lens_html"]


def _png_base64(image: np.ndarray) -> str:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr * (255 if arr.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _token_text(tokenizer: Any, i: int) -> str:
    if tokenizer is None:
        return f"#{i}"
    text = tokenizer.decode([int(i)])
    return text if text.strip() else repr(text)


def lens_data(result: LensResult, tokenizer: Any = None, image: int | None = 0, part: str = "auto",
              video: int | None = None, frame: int = 0) -> dict[str, Any]:
    """The JSON the page embeds: layers, per-position top-k and answer probabilities, the cells of one
    image (or of one frame of a video: ``video=``, ``frame=``)."""
    lay, b = result.layout, result.batch
    if video is not None:
        image = None
    cells, rows, cols = result._cells(image, video, frame, part)
    ids = lay.input_ids[b, result.positions].tolist()
    vocab = {int(i) for i in np.unique(result.top_ids.numpy())} | {int(i) for i in ids} | set(result.answer_ids)
    words = {i: _token_text(tokenizer, i) for i in vocab}
    return {
        "layers": result.layers,
        "norm": result.norm,
        "rows": rows,
        "cols": cols,
        "cells": [[i, r, c] for i, r, c in cells],
        "prompt": [words[i] for i in ids],
        "kinds": lay.kind[b, result.positions].tolist(),
        "positions": result.positions,
        "top": [[[[words[int(t)], round(float(p), 4)] for t, p in zip(result.top_ids[l, i].tolist(), result.top_probs[l, i].tolist())]
                 for i in range(len(result.positions))] for l in range(len(result.layers))],
        "answers": [words[a] for a in result.answer_ids],
        "answer_probs": np.round(result.answer_probs.float().numpy(), 4).tolist(),
    }


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
#wrap{display:flex;gap:18px;align-items:flex-start}
#img{position:relative;width:__W__px;height:__H__px;flex:none}
#img img{width:100%;height:100%;image-rendering:pixelated;display:block}
.cell{position:absolute;box-sizing:border-box;border:1px solid rgba(255,255,255,.35);cursor:pointer}
.cell:hover,.cell.pinned{outline:2px solid #0af;z-index:2}
.cell span{position:absolute;left:2px;top:1px;font-size:10px;color:#fff;text-shadow:0 0 2px #000;pointer-events:none}
#panel{min-width:340px}
table{border-collapse:collapse}td,th{padding:2px 6px;border-bottom:1px solid #eee;text-align:left;font-size:12px}
#prompt span{display:inline-block;margin:2px;padding:1px 4px;border:1px solid #ccc;border-radius:3px;cursor:pointer}
#prompt span.vis{background:#eef}#prompt span.pinned{outline:2px solid #0af}
.bar{display:inline-block;height:8px;background:#f80;vertical-align:middle;margin-right:4px}
</style></head><body>
<h3>__TITLE__</h3>
<div>layer <input id="layer" type="range" min="0" max="0" value="0"> <b id="lname"></b>
&nbsp; colour: <select id="colour"></select> &nbsp; <small>lens: <span id="norm"></span>; hover a cell or token, click to pin</small></div>
<div id="wrap"><div id="img"><img alt="input image" src="data:image/png;base64,__PNG__"></div>
<div id="panel"><div id="scale"></div><div id="what">hover a cell</div><table id="tab"></table></div></div>
<h4>prompt tokens</h4><div id="prompt"></div>
<script>
const D = __DATA__;
const L = D.layers.length, layer = document.getElementById('layer'), colour = document.getElementById('colour');
layer.max = L - 1; layer.value = L - 1; document.getElementById('norm').textContent = D.norm === 'final' ? 'final norm + unembed' : 'raw unembed (no final norm)';
const opt = (v, t) => { const o = document.createElement('option'); o.value = v; o.textContent = t; colour.appendChild(o); };
opt('top', 'top-1 probability'); D.answers.forEach((a, k) => opt('a' + k, 'P(' + a + ')'));
let pinned = null;
const box = document.getElementById('img'), cellDivs = [];
D.cells.forEach(([i, r, c]) => {
  const d = document.createElement('div'); d.className = 'cell';
  d.style.left = (100 * c / D.cols) + '%'; d.style.top = (100 * r / D.rows) + '%';
  d.style.width = (100 / D.cols) + '%'; d.style.height = (100 / D.rows) + '%';
  d.appendChild(document.createElement('span'));
  d.onmouseenter = () => { if (pinned === null) show(i); };
  d.onclick = () => pin(i, d);
  box.appendChild(d); cellDivs.push([i, d]);
});
const prompt = document.getElementById('prompt'), tokSpans = [];
D.prompt.forEach((t, i) => {
  const s = document.createElement('span'); s.textContent = t; if (D.kinds[i] === 1 || D.kinds[i] === 2) s.className = 'vis';
  s.title = 'position ' + D.positions[i];
  s.onmouseenter = () => { if (pinned === null) show(i); }; s.onclick = () => pin(i, s);
  prompt.appendChild(s); tokSpans.push(s);
});
function pin(i, el) {
  document.querySelectorAll('.pinned').forEach(e => e.classList.remove('pinned'));
  if (pinned === i) { pinned = null; return; }
  pinned = i; el.classList.add('pinned'); show(i);
}
function value(l, i) { const m = colour.value; return m === 'top' ? D.top[l][i][0][1] : D.answer_probs[l][i][+m.slice(1)]; }
function paint() {
  const l = +layer.value; document.getElementById('lname').textContent = D.layers[l];
  const vals = cellDivs.map(([i]) => value(l, i)), lo = Math.min(...vals), hi = Math.max(...vals), span = Math.max(hi - lo, 1e-9);
  document.getElementById('scale').textContent = 'colour: ' + lo.toFixed(3) + ' (clear) .. ' + hi.toFixed(3) + ' (orange) at this layer';
  cellDivs.forEach(([i, d]) => {
    const v = value(l, i); d.style.background = 'rgba(255,80,0,' + (0.05 + 0.75 * (v - lo) / span).toFixed(3) + ')';
    d.firstChild.textContent = D.top[l][i][0][0];
  });
}
function show(i) {
  const tab = document.getElementById('tab'); tab.textContent = '';
  document.getElementById('what').textContent = 'position ' + D.positions[i] + ' (' + D.prompt[i] + '): lens tokens per layer';
  const head = tab.insertRow(); ['layer', 'top tokens'].concat(D.answers.map(a => 'P(' + a + ')')).forEach(h => {
    const th = document.createElement('th'); th.textContent = h; head.appendChild(th); });
  for (let l = L - 1; l >= 0; l--) {
    const tr = tab.insertRow(); tr.insertCell().textContent = D.layers[l];
    const td = tr.insertCell();
    D.top[l][i].forEach(([t, p]) => { const s = document.createElement('span'); s.textContent = t + ' ' + p.toFixed(2) + '  '; s.style.opacity = 0.35 + 0.65 * p; td.appendChild(s); });
    D.answer_probs[l][i].forEach(p => { const c = tr.insertCell(); const b = document.createElement('span'); b.className = 'bar';
      b.style.width = Math.round(60 * p) + 'px'; c.appendChild(b); c.appendChild(document.createTextNode(p.toFixed(3))); });
  }
}
layer.oninput = paint; colour.onchange = paint; paint();
if (D.cells.length) { const [i0, d0] = cellDivs[Math.min(cellDivs.length - 1, Math.floor(cellDivs.length / 2))]; pin(i0, d0); }
</script></body></html>
"""


def lens_html(
    result: LensResult, image: np.ndarray, path: str | Path, tokenizer: Any = None, image_index: int = 0,
    part: str = "auto", title: str = "Logit lens", width: int = 448, video: int | None = None, frame: int = 0,
) -> Path:
    """Write the page for image ``image_index`` of ``result`` (or frame ``frame`` of video ``video``) to
    ``path``; ``image``: the HWC uint8 pixels shown under the grid (the image, or that video frame)."""
    data = lens_data(result, tokenizer, image_index, part, video=video, frame=frame)
    h, w = np.asarray(image).shape[:2]
    height = int(round(width * h / w))
    page = (_PAGE.replace("__TITLE__", html.escape(title)).replace("__W__", str(width)).replace("__H__", str(height))
            .replace("__PNG__", _png_base64(image)).replace("__DATA__", json.dumps(data).replace("</", "<\\/")))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
