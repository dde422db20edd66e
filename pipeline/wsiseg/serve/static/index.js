// wsiseg serve: the list of served slides, each linked to its viewer.
"use strict";
(async () => {
  const status = document.getElementById("status");
  const body = document.querySelector("#slides tbody");
  // The report is a plain page: a browser cannot send the token header when following a
  // link, so with a token the list below is the report.
  if (Object.keys(wsiseg.headers).length) document.getElementById("report").remove();
  try {
    const slides = await wsiseg.api("/slides");
    for (const s of slides) {
      const row = document.createElement("tr");
      row.dataset.slide = s.id;
      const cells = [
        "", s.id, s.round, s.rounds, wsiseg.fmt(s.tumor_mm2, 3), wsiseg.fmt(s.tissue_mm2, 3),
      ];
      cells.forEach((text, k) => {
        const td = document.createElement("td");
        if (k >= 2) td.className = "num";
        if (k === 1) {
          const a = document.createElement("a");
          a.href = `/view/${encodeURIComponent(s.id)}`;
          a.textContent = text;
          td.appendChild(a);
        } else {
          td.textContent = text;
        }
        row.appendChild(td);
      });
      body.appendChild(row);
      wsiseg.imageUrl(s.links.thumbnail).then((url) => {
        if (!url) return;
        const a = document.createElement("a");
        a.href = `/view/${encodeURIComponent(s.id)}`;
        const img = document.createElement("img");
        img.src = url;
        img.alt = s.id;
        a.appendChild(img);
        row.firstChild.appendChild(a);
      });
    }
    status.textContent = `${slides.length} slide(s)`;
  } catch (err) {
    status.textContent = `error: ${err.message}`;
    status.className = "error";
  }
})();
