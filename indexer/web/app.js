// The search page: one query state (texts, an image, "more like this" ids, exclusions, filters) sent as
// POST search; results drawn as a grid of thumbnails with scores. Plain JS, no dependencies, nothing
// loaded from elsewhere. Thumbnails are fetched (not <img src>) so that an API key can travel with them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageName: "", like: null, offset: 0, busy: false };
const urls = [];  // object URLs of the thumbnails on screen, revoked on a new search

function apiKey() {
  return sessionStorage.getItem("indexer-api-key") || "";
}

async function call(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("Authorization", "Bearer " + apiKey());
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    await askKey();
    return call(path, options);
  }
  return response;
}

function askKey() {
  return new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-form").onsubmit = () => {
      sessionStorage.setItem("indexer-api-key", $("key").value.trim());
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}

async function errorText(response) {
  try {
    const body = await response.json();
    return typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function lines(text) {
  return text.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

function numberOrNull(id) {
  const value = $(id).value;
  return value === "" ? null : Number(value);
}

function filters() {
  const out = {};
  if ($("f-folder").value.trim()) out.folder = $("f-folder").value.trim();
  const formats = lines($("f-format").value);
  if (formats.length) out.formats = formats;
  if ($("f-min-width").value !== "") out.min_width = numberOrNull("f-min-width");
  if ($("f-min-height").value !== "") out.min_height = numberOrNull("f-min-height");
  if ($("f-from").value) out.mtime_from = $("f-from").value + "T00:00:00";
  if ($("f-to").value) out.mtime_to = $("f-to").value + "T23:59:59";
  return out;
}

function requestBody() {
  const q = $("q").value.trim();
  const exclude = lines($("exclude").value);
  const body = {
    positive: { texts: q ? [q] : [], ids: state.like ? [state.like.id] : [], images: state.image ? [state.image] : [] },
    negative: { texts: exclude },
    filter: filters(),
    limit: numberOrNull("f-limit") || 24,
    offset: state.offset,
  };
  const threshold = numberOrNull("f-threshold");
  if (threshold !== null) body.threshold = threshold;
  return body;
}

function hasQuery() {
  return Boolean($("q").value.trim() || state.image || state.like);
}

async function search(append = false) {
  if (!hasQuery() || state.busy) return;
  state.busy = true;
  if (!append) {
    state.offset = 0;
    clearGrid();
  }
  setStatus("Searching…");
  try {
    const response = await call("search", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    if (!response.ok) {
      setStatus(await errorText(response), true);
      return;
    }
    const result = await response.json();
    showHits(result.hits, append);
    const shown = $("grid").children.length;
    setStatus(shown ? `${shown} images · ${Math.round(result.encode_ms + result.store_ms)} ms` : "No matches.");
    $("more").hidden = result.hits.length < requestBody().limit;
  } catch (e) {
    setStatus("The service cannot be reached: " + e.message, true);
  } finally {
    state.busy = false;
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function clearGrid() {
  urls.splice(0).forEach((u) => URL.revokeObjectURL(u));
  $("grid").replaceChildren();
  $("more").hidden = true;
}

function baseName(path) {
  return path.split(/[\\/]/).pop();
}

function showHits(hits, append) {
  const grid = $("grid");
  if (!append) grid.replaceChildren();
  for (const hit of hits) grid.appendChild(hitItem(hit));
}

function hitItem(hit) {
  const item = document.createElement("li");
  item.className = "hit";
  item.dataset.id = hit.id;
  item.dataset.path = hit.path;
  item.dataset.score = String(hit.score);
  const button = document.createElement("button");
  button.type = "button";
  button.title = `More like this · ${hit.path}` + (hit.width ? ` · ${hit.width}×${hit.height}` : "");
  const img = document.createElement("img");
  img.alt = baseName(hit.path);
  img.decoding = "async";
  button.appendChild(img);
  button.addEventListener("click", () => moreLike(hit));
  const caption = document.createElement("div");
  caption.className = "caption";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  const name = document.createElement("a");
  name.className = "name";
  name.textContent = baseName(hit.path);
  name.href = hit.image;
  name.addEventListener("click", (event) => openImage(event, hit));
  caption.append(score, name);
  item.append(button, caption);
  loadThumbnail(img, hit.thumbnail);
  return item;
}

async function loadThumbnail(img, url) {
  try {
    const response = await call(url);
    if (!response.ok) {
      img.replaceWith(placeholder(await errorText(response)));
      return;
    }
    const objectUrl = URL.createObjectURL(await response.blob());
    urls.push(objectUrl);
    img.src = objectUrl;
  } catch (e) {
    img.replaceWith(placeholder(e.message));
  }
}

function placeholder(reason) {
  const box = document.createElement("div");
  box.className = "missing";
  box.textContent = "no preview";
  box.title = reason;
  return box;
}

async function openImage(event, hit) {
  if (!apiKey()) return;  // without a key the plain link works
  event.preventDefault();
  const response = await call(hit.image);
  if (response.ok) window.open(URL.createObjectURL(await response.blob()), "_blank", "noopener");
}

function moreLike(hit) {
  state.like = { id: hit.id, name: baseName(hit.path), thumbnail: hit.thumbnail };
  state.image = null;
  $("q").value = "";
  showExamples();
  search();
}

function setImage(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    state.image = reader.result;
    state.imageName = file.name;
    state.like = null;
    showExamples();
    search();
  };
  reader.onerror = () => setStatus("Cannot read " + file.name, true);
  reader.readAsDataURL(file);
}

function showExamples() {
  const box = $("examples");
  box.replaceChildren();
  if (state.image) box.appendChild(chip("Image: " + state.imageName, state.image, () => (state.image = null)));
  if (state.like) box.appendChild(chip("Like: " + state.like.name, null, () => (state.like = null)));
}

function chip(label, src, onRemove) {
  const el = document.createElement("span");
  el.className = "chip";
  if (src) {
    const img = document.createElement("img");
    img.src = src;
    img.alt = "";
    el.appendChild(img);
  }
  el.appendChild(document.createTextNode(label));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.setAttribute("aria-label", "Remove " + label);
  remove.addEventListener("click", () => {
    onRemove();
    showExamples();
    if (hasQuery()) search();
    else clearGrid();
  });
  el.appendChild(remove);
  return el;
}

function setUpDrop() {
  // Listening on the document covers the drop zone too (events bubble): one drop, one search.
  const drop = $("drop");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  document.addEventListener("dragleave", () => drop.classList.remove("over"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    setImage(event.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (event) => setImage(event.target.files[0]));
  drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") $("file").click();
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (!$("q").value.trim() && !state.image && !state.like) {
      setStatus("Type what you look for, or drop an image.");
      return;
    }
    search();
  });
  $("more").addEventListener("click", () => {
    state.offset += requestBody().limit;
    search(true);
  });
  setUpDrop();
});
