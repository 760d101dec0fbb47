"""`report/index.html` (library module): one self-contained page with every table and figure of a
run's report, each under a caption naming the paper's counterpart. Images are referenced beside
the page (relative paths, no network); tables are inlined from their CSVs.
"""
from __future__ import annotations

import csv
import html
import os
from typing import Sequence

from dwjax.io import atomic

_STYLE = """body{font-family:sans-serif;max-width:1400px;margin:1em auto;padding:0 1em;color:#222}
h2{border-bottom:1px solid #ccc;margin-top:2em}p.cap{max-width:60em;color:#444}
img{max-width:100%;display:block;margin:.6em 0;border:1px solid #eee}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.scroll{overflow-x:auto;max-height:40em}
code{background:#f4f4f4}"""


def _table(path: str, max_rows: int) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    head, body = rows[0], rows[1:]
    out = ["<div class=scroll><table><tr>", *(f"<th>{html.escape(h)}</th>" for h in head), "</tr>"]
    for r in body[:max_rows]:
        out += ["<tr>", *(f"<td>{html.escape(c)}</td>" for c in r), "</tr>"]
    out.append("</table></div>")
    more = len(body) - max_rows
    note = f"<p>… {more} more rows in the CSV.</p>" if more > 0 else ""
    return "".join(out) + note


def write_page(out_dir: str, title: str, settings: dict, entries: Sequence,
               max_rows: int = 300) -> str:
    """Writes `<out_dir>/index.html` from `entries` (sections.Entry); returns its path."""
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}"
             f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
             "<h2>Settings</h2><table>",
             *(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
               for k, v in sorted(settings.items())),
             "</table><p class=cap>As recorded by <code>assign</code> in "
             "<code>assignments/_meta</code>: a kernel is clustered when its cosine dissimilarity "
             "to the nearest of <code>num_codes</code> evenly spaced decoded codes (the search's) "
             "is below the threshold; labels.json was proposed from the spectrum's 500 codes, and "
             "labels_naming_sha256 identifies its intervals and names. Layers are numbered as "
             "the network orders its depthwise layers of this kernel size, from 0, in every "
             "figure; by_layer.csv also gives the layer's id and name in the network.</p>",
             "<h2>Contents</h2><ol>",
             *(f"<li><a href='#s{i}'>{html.escape(e.title)}</a></li>"
               for i, e in enumerate(entries)), "</ol>"]
    for i, e in enumerate(entries):
        parts.append(f"<h2 id='s{i}'>{html.escape(e.title)}</h2><p class=cap>{e.caption}</p>")
        for fig in e.figures:
            rel = os.path.relpath(fig, out_dir)
            pdf = os.path.splitext(rel)[0] + ".pdf"
            link = (f" (<a href='{html.escape(pdf)}'>PDF</a>)"
                    if os.path.exists(os.path.join(out_dir, pdf)) else "")
            parts.append(f"<img src='{html.escape(rel)}' alt='{html.escape(rel)}'>"
                         f"<p><code>{html.escape(rel)}</code>{link}</p>")
        for t in e.tables:
            rel = os.path.relpath(t, out_dir)
            parts.append(f"<p><a href='{html.escape(rel)}'>{html.escape(rel)}</a></p>"
                         + _table(t, max_rows))
    # a browser check (tests, launch/check_report_page.sh) reads this attribute after load
    parts.append("<script>window.addEventListener('load',()=>{const i=[...document.images];"
                 "document.body.setAttribute('data-images-ok',i.filter(x=>x.complete&&"
                 "x.naturalWidth>0).length+'/'+i.length)})</script></body></html>")
    path = os.path.join(out_dir, "index.html")
    with atomic.atomic_open(path) as f:
        f.write("\n".join(parts))
    return path
