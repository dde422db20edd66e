// wsiseg serve: one slide's viewer. OpenSeadragon shows the store's image (Deep Zoom, working
// pixels); an SVG layer on top draws the AI contours and the stroke being drawn; the heat map
// is a second tiled image. A stroke is posted as a QuPath-style GeoJSON line on release, with
// ?contours=changed: the answer holds only the features the round added and the ids it
// removed, which the drawn paths follow in place (by feature id); undo likewise.
"use strict";
(async () => {
  const NS = "http://www.w3.org/2000/svg";
  const slideId = document.body.dataset.slide;
  const base = `/slides/${encodeURIComponent(slideId)}`;
  const statusEl = document.getElementById("status");
  const status = (text, error = false) => {
    statusEl.textContent = text;
    statusEl.className = error ? "error" : "";
  };
  const CLASS_COLOURS = { Tumor: [200, 0, 0], Stroma: [150, 200, 150] };

  let info;
  try {
    info = await wsiseg.api(base);
  } catch (err) {
    status(`error: ${err.message}`, true);
    return;
  }
  if (typeof OpenSeadragon === "undefined") {
    status("OpenSeadragon is missing (make web)", true);
    return;
  }
  // Working px ⇄ QuPath frame (level-0 px less the bounds offset).
  const scale = info.qupath_scale;
  const [offX, offY] = info.bounds_offset;
  const toQupath = ([x, y]) => [Math.round((x * scale - offX) * 100) / 100,
    Math.round((y * scale - offY) * 100) / 100];
  const toWorking = ([x, y]) => [(x + offX) / scale, (y + offY) / scale];

  const viewer = OpenSeadragon({
    id: "osd",
    prefixUrl: "/static/vendor/openseadragon/images/",
    tileSources: `${base}/image.dzi`,
    loadTilesWithAjax: true,
    ajaxHeaders: wsiseg.headers,
    showNavigator: true,
    gestureSettingsMouse: { clickToZoom: false },
    maxZoomPixelRatio: 4,
  });

  // -- the SVG layer ---------------------------------------------------------------------
  const svg = document.createElementNS(NS, "svg");
  svg.id = "overlay";
  const world = document.createElementNS(NS, "g");  // image (working px) coordinates
  const layer = document.createElementNS(NS, "g");
  layer.id = "contours";
  const strokeLayer = document.createElementNS(NS, "g");
  strokeLayer.id = "stroke";
  world.append(layer, strokeLayer);
  svg.appendChild(world);
  viewer.canvas.appendChild(svg);

  const image = () => viewer.world.getItemAt(0);
  function placeWorld() {
    if (!image()) return;
    const p0 = image().imageToViewerElementCoordinates(new OpenSeadragon.Point(0, 0));
    const p1 = image().imageToViewerElementCoordinates(new OpenSeadragon.Point(1000, 0));
    const s = (p1.x - p0.x) / 1000;
    world.setAttribute("transform", `translate(${p0.x} ${p0.y}) scale(${s})`);
  }
  ["open", "animation", "update-viewport", "resize"].forEach((e) => viewer.addHandler(e, placeWorld));

  function pathOf(geometry) {
    const polygons = geometry.type === "Polygon" ? [geometry.coordinates] :
      geometry.type === "MultiPolygon" ? geometry.coordinates : [];
    return polygons.map((rings) => rings.map((ring) => "M" + ring.map((xy) =>
      toWorking(xy).map((v) => v.toFixed(2)).join(" ")).join("L") + "Z").join("")).join("");
  }
  const paths = new Map();  // feature id → <path>
  function addPaths(features) {
    for (const f of features) {
      if (paths.has(f.id)) continue;  // unchanged contours keep their id and their path
      const path = document.createElementNS(NS, "path");
      path.setAttribute("d", pathOf(f.geometry));
      path.dataset.id = f.id;
      layer.appendChild(path);
      paths.set(f.id, path);
    }
  }
  function removePaths(ids) {
    for (const id of ids) {
      paths.get(id)?.remove();
      paths.delete(id);
    }
  }
  function showRound(round) {
    layer.dataset.round = round;
    layer.dataset.count = paths.size;
  }
  // A whole round's contours (GET .../contours): the paths of other ids go.
  function showContours(collection, round) {
    const ids = new Set(collection.features.map((f) => f.id));
    removePaths([...paths.keys()].filter((id) => !ids.has(id)));
    addPaths(collection.features);
    showRound(round);
  }
  // A ?contours=changed answer: the change from the round shown, or, when the slide moved on
  // in between (another client's round or undo: the answer starts from another round, or
  // removes ids not drawn here), the whole round fetched anew.
  async function followChange(answer) {
    const removed = answer.changed.removed;
    if (String(answer.previous_round) === layer.dataset.round &&
        removed.every((id) => paths.has(id))) {
      removePaths(removed);
      addPaths(answer.contours.features);
      showRound(answer.round);
    } else {
      showContours(await wsiseg.api(`${base}/contours`), answer.round);
    }
  }

  // -- heat map --------------------------------------------------------------------------
  let heat = null;
  let version = info.version;
  const heatBox = document.getElementById("heat");
  function showHeat() {
    const old = heat;
    heat = null;
    if (!heatBox.checked) {
      if (old) viewer.world.removeItem(old);
      return;
    }
    viewer.addTiledImage({
      tileSource: `${base}/heatmap.dzi?v=${encodeURIComponent(version)}`,
      opacity: 0.45,
      success: (event) => {
        heat = event.item;
        if (old) viewer.world.removeItem(old);
      },
    });
  }
  heatBox.addEventListener("change", showHeat);
  document.getElementById("show-contours").addEventListener("change", (e) => {
    layer.style.display = e.target.checked ? "" : "none";
  });

  // -- history ---------------------------------------------------------------------------
  async function showHistory() {
    const rounds = await wsiseg.api(`${base}/history`);
    const body = document.querySelector("#history tbody");
    body.replaceChildren();
    for (const r of rounds.slice().reverse()) {
      const row = document.createElement("tr");
      if (r === rounds[rounds.length - 1]) row.className = "current";
      for (const text of [r.round, r.refiner || r.kind, r.new_pixels ?? "", r.windows ?? "",
        wsiseg.fmt(r.tumor_mm2, 3), wsiseg.fmt(r.seconds, 2), wsiseg.fmt(r.refine_seconds, 2)]) {
        const td = document.createElement("td");
        td.textContent = text;
        row.appendChild(td);
      }
      body.appendChild(row);
    }
    document.body.dataset.rounds = rounds.length;
  }

  async function refreshAfter(answer, what) {
    await followChange(answer);
    version = (await wsiseg.api(base)).version;
    if (heatBox.checked) showHeat();
    await showHistory();
    const t = answer.timings || {};
    status(`${what}: round ${answer.round}` + (answer.message ? ` (${answer.message})` : "") +
      (t.served_s !== undefined ? `, ${t.served_s.toFixed(2)} s (network ` +
        `${t.network_s.toFixed(2)} s)` : ""));
  }

  // -- brushes ---------------------------------------------------------------------------
  let mode = "pan";
  for (const button of document.querySelectorAll("button.mode")) {
    button.addEventListener("click", () => {
      mode = button.dataset.mode;
      document.querySelectorAll("button.mode").forEach((b) => b.classList.toggle("active", b === button));
      viewer.setMouseNavEnabled(mode === "pan");
      svg.classList.toggle("drawing", mode !== "pan");
    });
  }
  const toImage = (event) => {
    const rect = viewer.element.getBoundingClientRect();
    const p = image().viewerElementToImageCoordinates(
      new OpenSeadragon.Point(event.clientX - rect.left, event.clientY - rect.top));
    return [p.x, p.y];
  };
  let points = null;
  let line = null;
  svg.addEventListener("pointerdown", (event) => {
    if (mode === "pan" || !image()) return;
    event.preventDefault();
    event.stopPropagation();
    svg.setPointerCapture(event.pointerId);
    points = [toImage(event)];
    line = document.createElementNS(NS, "polyline");
    line.setAttribute("stroke", `rgb(${CLASS_COLOURS[mode].join(",")})`);
    strokeLayer.appendChild(line);
  });
  svg.addEventListener("pointermove", (event) => {
    if (!points) return;
    event.stopPropagation();
    points.push(toImage(event));
    line.setAttribute("points", points.map((p) => p.join(",")).join(" "));
  });
  svg.addEventListener("pointerup", async (event) => {
    if (!points) return;
    event.stopPropagation();
    const stroke = points;
    const drawn = line;
    const className = mode;
    points = null;
    const coordinates = stroke.map(toQupath);
    const geometry = coordinates.length > 1 ? { type: "LineString", coordinates } :
      { type: "Point", coordinates: coordinates[0] };
    const feature = {
      type: "Feature",
      id: (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)),
      geometry,
      properties: {
        objectType: "annotation",
        classification: { name: className, color: CLASS_COLOURS[className] },
      },
    };
    status("refining…");
    try {
      const answer = await wsiseg.api(`${base}/scribbles?contours=changed`, {
        method: "POST",
        headers: { "Content-Type": "application/geo+json" },
        body: JSON.stringify({ type: "FeatureCollection", features: [feature] }),
      });
      await refreshAfter(answer, "stroke");
    } catch (err) {
      status(`refused: ${err.message}`, true);
    } finally {
      drawn.remove();
    }
  });

  document.getElementById("undo").addEventListener("click", async () => {
    status("undoing…");
    try {
      const answer = await wsiseg.api(`${base}/undo?contours=changed`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: "{}",
      });
      await refreshAfter(answer, "undo");
    } catch (err) {
      status(`undo: ${err.message}`, true);
    }
  });

  // -- start -----------------------------------------------------------------------------
  viewer.addOnceHandler("open", async () => {
    const contours = await wsiseg.api(`${base}/contours`);
    showContours(contours, info.round);
    await showHistory();
    placeWorld();
    status(`round ${info.round}, ${paths.size} contour(s)`);
    document.body.dataset.ready = "1";
  });
  // For tests and scripts: image (working px) → page coordinates.
  window.wsisegView = {
    heatLoaded: () => Boolean(heat && heat.getFullyLoaded()),
    imageToPage(x, y) {
      const p = image().imageToViewerElementCoordinates(new OpenSeadragon.Point(x, y));
      const rect = viewer.element.getBoundingClientRect();
      return [p.x + rect.left, p.y + rect.top];
    },
  };
})();
