"""jsae's own attribution-graph viewer: one static page beside the graph JSON, no server.

:func:`write_graph_page` writes into a folder::

    graph.html, graph.js, graph.css   the viewer (copied from the atlas's ``site_assets/``)
    graph-data.js                     the graph JSON and each feature node's atlas card URL

Like the atlas site it opens from ``file://`` (Chromium refuses ``fetch()`` of local files, so
the data is a script that sets ``window.__graph_data``) and needs no network. Rows are layers
(embeddings at the bottom, logits on top), columns positions; hover shows a node's label, a
click pins it and opens a feature's atlas card (``<atlas>/index.html#l=LAYER&f=ID``) in the
side panel; pinned nodes group into a supernode whose links are the sums of its members'.
The pins and groups are kept in the URL (``#pins=...&groups=NAME:ID,ID``); without one the
graph's ``qParams`` (circuit-tracer's pinned ids and supernodes) start the view.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from jsae.analysis.atlas.site import ASSETS

FILES = ("graph.html", "graph.js", "graph.css", "graph-data.js")


def card_url(atlas_index: str, layer: int | None, feature: int) -> str:
    """The URL of a feature's card in an atlas site (``atlas_index``: its index.html, relative
    to the page); ``layer`` for a site of several layers."""
    route = ([f"l={int(layer)}"] if layer is not None else []) + [f"f={int(feature)}"]
    return f"{atlas_index}#{'&'.join(route)}"


def _script_json(obj) -> str:
    # inside <script>: no "</script>" can appear ("<" escaped), no NaN
    return json.dumps(obj, ensure_ascii=True, allow_nan=False).replace("<", "\\u003c")


def write_graph_page(out_dir, doc: dict, *, cards: Mapping[str, str] | None = None,
                     atlas_href: str | None = None, title: str | None = None) -> Path:
    """Write the viewer of the graph file ``doc`` (:func:`jsae.circuits.graph_json.graph_json`)
    into ``out_dir``; ``cards``: node id -> atlas card URL of each feature node that has one;
    ``atlas_href``: the atlas's index page (the header links to it). Returns graph.html."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("graph.js", "graph.css"):
        shutil.copyfile(ASSETS / name, out / name)
    payload = {"graph": doc, "cards": dict(cards or {})}
    (out / "graph-data.js").write_text(f"window.__graph_data = {_script_json(payload)};\n",
                                       encoding="ascii")
    title = title or f"jsae circuit: {doc['metadata']['prompt']}"
    page = (ASSETS / "graph.html").read_text(encoding="utf-8")
    page = page.replace("{{TITLE}}", html.escape(title)).replace(
        "{{ATLAS}}", html.escape(atlas_href or "graph.html", quote=True))
    (out / "graph.html").write_text(page, encoding="utf-8")
    return out / "graph.html"


__all__ = ["FILES", "card_url", "write_graph_page"]
