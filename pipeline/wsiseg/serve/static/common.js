// wsiseg serve, shared by the pages: the token (from the URL fragment, kept for this tab) and
// fetch helpers that send it as the X-Wsiseg-Token header.
"use strict";
const wsiseg = (() => {
  const found = location.hash.match(/token=([^&]+)/);
  if (found) {
    sessionStorage.setItem("wsiseg-token", decodeURIComponent(found[1]));
    history.replaceState(null, "", location.pathname);  // keep it out of the address bar
  }
  const token = sessionStorage.getItem("wsiseg-token");
  const headers = token ? { "X-Wsiseg-Token": token } : {};

  async function api(path, options = {}) {
    const response = await fetch(path, {
      ...options, headers: { ...headers, ...(options.headers || {}) },
    });
    const text = await response.text();
    let body = text;
    try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      throw new Error(body && body.detail ? body.detail : `HTTP ${response.status}`);
    }
    return body;
  }

  async function imageUrl(path) {
    const response = await fetch(path, { headers });
    return response.ok ? URL.createObjectURL(await response.blob()) : null;
  }

  const fmt = (value, digits) => (value === null || value === undefined ? "" :
    Number(value).toFixed(digits));
  return { api, imageUrl, headers, fmt };
})();
