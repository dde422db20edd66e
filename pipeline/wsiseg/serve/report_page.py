"""The run's ``report.html`` as the server shows it: each slide linked to its viewer.

``wsiseg run`` writes ``report.html`` as plain HTML with links relative to the run folder
(:mod:`wsiseg.report`). Served at ``/report.html``, each slide's name links to its viewer
(``/view/<id>``) instead of its GeoJSON, and its thumbnail comes from the server; the file on
disk is never changed.
"""

from __future__ import annotations

import html
from urllib.parse import quote

from wsiseg.report import REPORT_NAME
from wsiseg.serve.registry import SlideRegistry


def served_report(registry: SlideRegistry) -> str | None:
    """The report of the served run with viewer links; None when the run has none."""
    for out_dir in dict.fromkeys(s.out_dir for s in registry.slides.values()):
        path = out_dir / REPORT_NAME
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        for slide in registry.slides.values():
            if slide.out_dir != out_dir:
                continue
            sid = html.escape(slide.id, quote=True)
            url = html.escape(quote(slide.id, safe=""), quote=True)
            text = text.replace(f'href="{sid}.geojson"', f'href="/view/{url}"')
            text = text.replace(f'="{sid}.png"', f'="/slides/{url}/thumbnail"')
        return text
    return None
