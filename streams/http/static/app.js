// The samestyle search page: plain DOM, no build step. Talks to the same worker's JSON API.
"use strict";

const $ = (id) => document.getElementById(id);
let imageFile = null;

function palette(text) {
  // A stable colour per category: the placeholder thumbnail for listings without a served image.
  let h = 0;
  for (const c of text || "?") h = (h * 31 + c.charCodeAt(0)) % 360;
  return `hsl(${h} 45% 48%)`;
}

function fmt(x) { return x === null || x === undefined ? "–" : x.toFixed(3); }

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const c of children) node.append(c);
  return node;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function api(path, options) {
  const response = await fetch(path, options);
  // Signed out (the API token changed, or the session cookie was dropped): show the sign-in form.
  if (response.status === 401) { window.location.assign("/"); throw new Error("signed out"); }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON: keep null */ }
  if (!response.ok) throw new Error(body && body.error ? body.error : `HTTP ${response.status}`);
  return body;
}

function card(result, context) {
  // The leaf of a category path ("Home > Drinkware > Mugs" -> "Mugs") names the placeholder.
  const label = ((result.category || "").split(">").pop() || result.title || "?").trim();
  let thumb;
  if (result.thumbnail) {
    thumb = el("img", { className: "thumb", src: result.thumbnail, alt: result.title || label, loading: "lazy" });
  } else {  // no image the server can read: a coloured tile named after the category
    thumb = el("div", { className: "thumb", textContent: label.slice(0, 2).toUpperCase(), title: label });
    thumb.style.background = palette(label);
  }
  const views = el("div", { className: "views" });
  for (const [name, short] of [["image", "I"], ["text", "T"], ["image_text", "IT"]]) {
    const value = result.scores ? result.scores[name] : null;
    if (value !== null && value !== undefined) views.append(el("span", { title: `${name} cosine`, textContent: `${short} ${fmt(value)}` }));
  }
  const body = el("div", { className: "body" },
    el("div", { className: "title", textContent: result.title || result.listing_id }),
    el("div", { className: "meta", textContent: `${result.supplier_id} · ${result.category || "no category"}` }),
    el("div", { className: "meta", textContent: result.listing_id }),
    el("div", { className: "score", textContent: `score ${fmt(result.score)}` }),
    views);
  if (result.duplicate) body.append(el("span", { className: "badge", textContent: "duplicate" }));
  const actions = el("div", { className: "actions" },
    el("button", { type: "button", className: "similar", textContent: "Similar", onclick: () => neighbours(result.listing_id, "similar") }),
    el("button", { type: "button", className: "duplicates", textContent: "Duplicates", onclick: () => neighbours(result.listing_id, "duplicates") }));
  const node = el("article", { className: "card" + (result.duplicate ? " dup" : "") }, thumb, body, actions);
  node.dataset.listingId = result.listing_id;
  node.dataset.context = context;
  return node;
}

function render(results, context, header) {
  const box = $("results");
  box.replaceChildren();
  if (header) box.append(header);
  for (const r of results) box.append(card(r, context));
  box.dataset.context = context;
  box.dataset.count = String(results.length);
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function search(event) {
  event.preventDefault();
  showError("");
  const text = $("q-text").value.trim();
  const modifier = $("q-modifier").value.trim();
  const body = { k: Number($("q-k").value) || 10 };
  if (imageFile) {
    body.image = await readAsDataURL(imageFile);
    // With an image, the search box works as the modifier when the modifier field is empty.
    if (modifier || text) body.modifier = modifier || text;
  } else if (text || modifier) {
    body.text = text || modifier;
  }
  $("q-submit").disabled = true;
  $("status").textContent = "searching…";
  try {
    const r = await api("/search", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const q = r.query;
    const what = q.mode === "image_text" ? `image + “${q.text}”` : q.mode === "image" ? "image" : `“${q.text}”`;
    $("status").textContent = `${r.results.length} results for ${what} (${q.searched_view} → IT) in ${r.took_ms} ms · ${r.model_version}`;
    $("status").dataset.mode = q.mode;
    render(r.results, "search:" + q.mode);
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  } finally {
    $("q-submit").disabled = false;
  }
}

async function neighbours(listingId, kind) {
  showError("");
  try {
    const r = await api(`/listings/${encodeURIComponent(listingId)}/${kind}?k=${Number($("q-k").value) || 10}`);
    const title = r.listing.title || listingId;
    const header = el("div", { className: "context" },
      el("strong", { textContent: kind === "duplicates" ? `Duplicates of “${title}”` : `Similar to “${title}”` }),
      el("span", { textContent: kind === "duplicates"
        ? `same supplier (${r.listing.supplier_id}), image+text cosine ≥ ${r.duplicate_threshold}` : `by image+text cosine` }));
    $("status").textContent = `${r.results.length} ${kind} · ${r.model_version}`;
    $("status").dataset.mode = kind;
    render(r.results, kind + ":" + listingId, header);
  } catch (e) {
    showError(e.message);
  }
}

function setImage(file) {
  imageFile = file || null;
  const preview = $("q-preview");
  if (imageFile) {
    preview.src = URL.createObjectURL(imageFile);
    preview.hidden = false;
    $("drop-hint").textContent = imageFile.name;
    $("q-clear").hidden = false;
  } else {
    preview.hidden = true;
    preview.removeAttribute("src");
    $("drop-hint").replaceChildren("Drop an image here, or ",
      el("label", { htmlFor: "q-image", className: "link", textContent: "choose a file" }));
    $("q-clear").hidden = true;
    $("q-image").value = "";
  }
}

async function refreshStats() {
  try {
    const s = await api("/stats");
    $("stat-index").textContent = s.index_size.toLocaleString();
    const lag = Object.entries(s.lag).map(([k, v]) => `${k} ${v}`).join(", ");
    $("stat-lag").textContent = lag || "0";
    $("stat-model").textContent = s.model_version || "not loaded";
    $("stat-worker").textContent = s.worker_id + (s.ok ? "" : " (unhealthy)");
  } catch (e) {
    $("stat-worker").textContent = "unreachable";
  }
}

$("search-form").addEventListener("submit", search);
$("q-image").addEventListener("change", (e) => setImage(e.target.files[0]));
$("q-clear").addEventListener("click", () => setImage(null));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
});
// ------------------------------------------------------------------ moderation view

const MODERATOR_KEY = "samestyle.moderator";
let lastAlerts = "";

function thumbOf(listing, fallbackId) {
  if (listing && listing.thumbnail) {
    return el("img", { className: "thumb", src: listing.thumbnail, alt: listing.title || fallbackId, loading: "lazy" });
  }
  const label = ((listing && listing.category) || "").split(">").pop().trim() || fallbackId;
  const tile = el("div", { className: "thumb", textContent: label.slice(0, 2).toUpperCase(), title: label });
  tile.style.background = palette(label);
  return tile;
}

function side(role, listing, listingId) {
  return el("div", { className: "side " + role },
    thumbOf(listing, listingId),
    el("div", { className: "body" },
      el("div", { className: "role", textContent: role === "copy" ? "listing (newer)" : "duplicate of (older)" }),
      el("div", { className: "title", textContent: (listing && listing.title) || listingId }),
      el("div", { className: "meta", textContent: listingId + (listing ? "" : " · no longer indexed") })));
}

function verdictText(d) {
  return `${d.decision} by ${d.moderator_id} · ${new Date(d.decided_at).toLocaleString()}`;
}

function alertCard(a) {
  const views = el("div", { className: "views" });
  for (const [name, short] of [["image", "I"], ["text", "T"], ["image_text", "IT"]]) {
    const value = a.scores[name];
    if (value !== null && value !== undefined) views.append(el("span", { title: `${name} cosine`, textContent: `${short} ${fmt(value)}` }));
  }
  const verdict = el("div", { className: "verdict" });
  const buttons = el("div", { className: "buttons" },
    el("button", { type: "button", className: "confirm", textContent: "Confirm", onclick: () => decide(a, "confirmed", node) }),
    el("button", { type: "button", className: "reject", textContent: "Reject", onclick: () => decide(a, "rejected", node) }));
  const info = el("div", { className: "verdict-box" },
    el("div", { className: "score", textContent: `score ${fmt(a.score)} · probability ${fmt(a.probability)}` }),
    views,
    el("div", { className: "meta", textContent: `${a.supplier_id} · ${a.model_version} · ${a.decided_by || "?"} ≥ ${fmt(a.threshold)}` }),
    el("div", { className: "meta", textContent: new Date(a.emitted_at).toLocaleString() }),
    buttons, verdict);
  const node = el("article", { className: "alert" }, side("copy", a.listing, a.listing_id),
    side("original", a.original, a.duplicate_of), info);
  node.dataset.listingId = a.listing_id;
  node.dataset.duplicateOf = a.duplicate_of;
  if (a.decision) markDecided(node, a.decision);
  return node;
}

function markDecided(node, d) {
  node.classList.remove("confirmed", "rejected");
  node.classList.add(d.decision);
  node.dataset.decision = d.decision;
  node.querySelector(".verdict").textContent = verdictText(d);
}

async function decide(alert, decision, node) {
  showError("");
  const moderator = $("mod-moderator").value.trim();
  if (!moderator) { showError("Enter your moderator id first."); $("mod-moderator").focus(); return; }
  localStorage.setItem(MODERATOR_KEY, moderator);
  for (const b of node.querySelectorAll("button")) b.disabled = true;
  try {
    const r = await api("/moderation/decisions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ listing_id: alert.listing_id, duplicate_of: alert.duplicate_of, decision, moderator_id: moderator }) });
    markDecided(node, r.decision);
  } catch (e) {
    showError(e.message);
  } finally {
    for (const b of node.querySelectorAll("button")) b.disabled = false;
  }
}

async function refreshAlerts() {
  if ($("view-moderation").hidden) return;
  const params = new URLSearchParams();
  const supplier = $("mod-supplier").value.trim();
  if (supplier) params.set("supplier", supplier);
  if ($("mod-min-score").value !== "") params.set("min_score", $("mod-min-score").value);
  if ($("mod-min-probability").value !== "") params.set("min_probability", $("mod-min-probability").value);
  try {
    const r = await api("/moderation/alerts?" + params.toString());
    const key = JSON.stringify(r);
    if (key === lastAlerts) return;  // unchanged: keep the DOM (and any button under the pointer)
    lastAlerts = key;
    $("mod-status").textContent = `${r.alerts.length} alerts shown · ${r.buffered} of the newest ${r.capacity} held`
      + (r.ready ? "" : " · loading…");
    $("alerts").replaceChildren(...r.alerts.map(alertCard));
    $("alerts").dataset.count = String(r.alerts.length);
  } catch (e) {
    showError(e.message);
  }
}

function showView() {
  const moderation = window.location.hash === "#moderation";
  $("view-search").hidden = moderation;
  $("view-moderation").hidden = !moderation;
  $("nav-search").classList.toggle("active", !moderation);
  $("nav-moderation").classList.toggle("active", moderation);
  showError("");
  if (moderation) { lastAlerts = ""; refreshAlerts(); }
}

$("mod-moderator").value = localStorage.getItem(MODERATOR_KEY) || "";
$("mod-moderator").addEventListener("change", () => localStorage.setItem(MODERATOR_KEY, $("mod-moderator").value.trim()));
for (const id of ["mod-supplier", "mod-min-score", "mod-min-probability"]) {
  $(id).addEventListener("input", () => { lastAlerts = ""; refreshAlerts(); });
}
$("moderation-form").addEventListener("submit", (e) => e.preventDefault());
window.addEventListener("hashchange", showView);
showView();

refreshStats();
setInterval(refreshStats, 2000);
setInterval(refreshAlerts, 2000);
