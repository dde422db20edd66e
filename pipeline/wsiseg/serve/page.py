"""The browser page's HTML shells: the slide list (``/``) and a slide's viewer (``/view/id``).

They hold no slide data (so they are served without the token): the scripts in ``static/``
fetch it from the data routes, sending the token the URL fragment carried
(``http://host:port/#token=...``). The viewer runs OpenSeadragon, built from the npm package
pinned in ``web/package-lock.json`` and copied into ``static/vendor/`` by ``make web``.
"""

from __future__ import annotations

import html
from pathlib import Path

VENDOR_OSD = Path(__file__).resolve().parent / "static" / "vendor" / "openseadragon"

_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<link rel="stylesheet" href="/static/wsiseg.css">
</head>"""


def index_html() -> str:
    return "\n".join([
        _HEAD.format(title="wsiseg: slides"),
        "<body>",
        "<h1>wsiseg slides</h1>",
        '<p><a href="/report.html" id="report">the run\'s report</a></p>',
        '<p id="status">loading…</p>',
        '<table id="slides"><thead><tr><th>thumbnail</th><th>slide</th><th>round</th>'
        "<th>rounds</th><th>tumor mm²</th><th>tissue mm²</th></tr></thead><tbody></tbody>"
        "</table>",
        '<script src="/static/common.js"></script>',
        '<script src="/static/index.js"></script>',
        "</body></html>", "",
    ])


def viewer_html(slide_id: str) -> str:
    sid = html.escape(slide_id, quote=True)
    missing = "" if (VENDOR_OSD / "openseadragon.min.js").is_file() else (
        '<p class="error">OpenSeadragon is not built into this installation: run '
        "<code>make web</code> (npm) in the wsiseg checkout.</p>")
    return "\n".join([
        _HEAD.format(title=f"wsiseg: {sid}"),
        f'<body data-slide="{sid}">',
        f'<header><a href="/" id="back">← slides</a> <strong>{sid}</strong>',
        '<span class="tools">',
        '<button id="pan" class="mode active" data-mode="pan">Pan</button>',
        '<button id="brush-tumor" class="mode" data-mode="Tumor">Tumor brush</button>',
        '<button id="brush-stroma" class="mode" data-mode="Stroma">Non-tumor brush</button>',
        '<button id="undo">Undo</button>',
        '<label><input type="checkbox" id="heat"> heat map</label>',
        '<label><input type="checkbox" id="show-contours" checked> contours</label>',
        '</span> <span id="status">loading…</span></header>',
        missing,
        '<main><div id="osd"></div>',
        '<aside><h2>Rounds</h2><table id="history"><thead><tr><th>round</th><th>kind</th>'
        "<th>new px</th><th>windows</th><th>tumor mm²</th><th>s</th><th>net s</th>"
        "</tr></thead><tbody></tbody></table></aside></main>",
        '<script src="/static/vendor/openseadragon/openseadragon.min.js"></script>',
        '<script src="/static/common.js"></script>',
        '<script src="/static/viewer.js"></script>',
        "</body></html>", "",
    ])
