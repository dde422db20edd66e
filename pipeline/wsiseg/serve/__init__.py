"""``wsiseg serve``: the refine loop over HTTP, for QuPath (a Groovy script) and a browser page.

One process serves the slide stores of a run directory. Each POSTed scribble export becomes one
refine round run by the very code ``wsiseg refine`` runs (:func:`wsiseg.refine.refine_round`
with the refiner of :func:`wsiseg.session.make_refiner`, loaded once), so the files on disk
after a served round are those the command would have written, and CLI and server can be
mixed on one store.

Modules, one concept each:

- :mod:`~wsiseg.serve.registry` — the served slides, looked up by id (never joined into paths);
- :mod:`~wsiseg.serve.queue` — one round at a time per slide, in arrival order;
- :mod:`~wsiseg.serve.rounds` — a served round / undo and what it answers;
- :mod:`~wsiseg.serve.tiles` — Deep Zoom tiles of the image and of the tumor probability;
- :mod:`~wsiseg.serve.warm` — the slide a client opened last traced once in the background,
  so the strokes that follow re-trace only the chunks they change;
- :mod:`~wsiseg.serve.guard` — token, host check and body size limit (ASGI middleware);
- :mod:`~wsiseg.serve.app` — the FastAPI routes; :mod:`~wsiseg.serve.main` — start-up.
"""
