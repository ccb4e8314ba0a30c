// The search page: one query state (texts, an image, "more like this" ids, exclusions, filters) sent as
// POST search; results drawn as a grid of thumbnails with scores. Plain JS, no dependencies, nothing
// loaded from elsewhere. Thumbnails are fetched (not <img src>) so that an API key can travel with them.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, imageName: "", like: null, cluster: null, offset: 0, busy: false };
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
  if (state.cluster) out.cluster = state.cluster.id;
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
    sort: $("sort").value,
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
  if (state.cluster) box.appendChild(chip(`In cluster ${state.cluster.id}`, null, () => (state.cluster = null)));
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
  $("sort").addEventListener("change", () => {
    if (hasQuery()) search();
  });
  setUpDrop();
  setUpViews();
  setUpDuplicates();
  setUpClusters();
});

// --- views -----------------------------------------------------------------------------------------------

function showView(name) {
  for (const button of document.querySelectorAll("#views button")) {
    button.setAttribute("aria-pressed", String(button.dataset.view === name));
  }
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== "view-" + name;
  if (name === "clusters") loadClusters();
}

function setUpViews() {
  for (const button of document.querySelectorAll("#views button")) {
    button.addEventListener("click", () => showView(button.dataset.view));
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function say(id, text, isError = false) {
  $(id).textContent = text;
  $(id).classList.toggle("error", isError);
}

async function postJson(path, body) {
  return call(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
}

// Polls a job (a duplicate scan or a clustering run) until it is no longer running; shows its progress.
async function pollJob(path, progressId, statusId, label) {
  const bar = $(progressId);
  bar.hidden = false;
  try {
    for (;;) {
      const response = await call(path);
      if (!response.ok) throw new Error(await errorText(response));
      const job = await response.json();
      if (job.total > 0) {
        bar.max = job.total;
        bar.value = job.done;
      } else {
        bar.removeAttribute("value");
      }
      if (job.state !== "running") return job;
      const part = job.total > 0 ? ` ${job.done} of ${job.total}` : "";
      say(statusId, `${label}: ${job.phase}${part}…`);
      await sleep(250);
    }
  } finally {
    bar.hidden = true;
  }
}

// Frees the thumbnails' object URLs inside a container that is about to be redrawn.
function revokeIn(container) {
  for (const img of container.querySelectorAll("img")) {
    const at = urls.indexOf(img.src);
    if (at >= 0) {
      URL.revokeObjectURL(img.src);
      urls.splice(at, 1);
    }
  }
}

function humanBytes(n) {
  if (n < 0) return "?";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function dateText(seconds) {
  return new Date(seconds * 1000).toISOString().slice(0, 16).replace("T", " ");
}

function requestId() {
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  return String(Date.now()) + "-" + Math.random().toString(16).slice(2);
}

// --- duplicates ------------------------------------------------------------------------------------------

const PAGE_GROUPS = 10;
// scan: the finished scan; page: the groups on screen; choices: group index -> {keeper, exclude: Set of ids}
const dup = { scan: null, offset: 0, page: [], choices: new Map(), pending: null };

function setUpDuplicates() {
  $("dup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    startScan();
  });
  $("dup-prev").addEventListener("click", () => loadGroups(Math.max(0, dup.offset - PAGE_GROUPS)));
  $("dup-next").addEventListener("click", () => loadGroups(dup.offset + PAGE_GROUPS));
  $("dup-move-all").addEventListener("click", () => planAction("move", dup.page.map((g) => g.index)));
  $("dup-delete-all").addEventListener("click", () => planAction("delete", dup.page.map((g) => g.index)));
  $("plan-dialog").addEventListener("close", () => finishAction($("plan-dialog").returnValue));
  $("plan-confirm").addEventListener("change", () => {
    $("plan-apply").disabled = !$("plan-confirm").checked;
  });
}

async function startScan() {
  const body = { tier: $("dup-tier").value };
  const threshold = numberOrNull("dup-threshold");
  if (threshold !== null && body.tier !== "exact") body.threshold = threshold;
  if ($("dup-folder").value.trim()) body.folder = $("dup-folder").value.trim();
  $("dup-find").disabled = true;
  dup.scan = null;
  dup.choices.clear();
  $("dup-groups").replaceChildren();
  $("dup-bar").hidden = true;
  $("dup-pager").hidden = true;
  say("dup-status", "Starting the scan…");
  try {
    const response = await postJson("duplicates/scans", body);
    if (!response.ok) throw new Error(await errorText(response));
    const started = await response.json();
    const job = await pollJob(`duplicates/scans/${started.id}?limit=1`, "dup-progress", "dup-status", "Scanning");
    if (job.state === "failed") throw new Error(job.error);
    dup.scan = job;
    await loadGroups(0);
  } catch (e) {
    say("dup-status", e.message, true);
  } finally {
    $("dup-find").disabled = false;
  }
}

async function loadGroups(offset) {
  const response = await call(`duplicates/scans/${dup.scan.id}?offset=${offset}&limit=${PAGE_GROUPS}`);
  if (!response.ok) {
    say("dup-status", await errorText(response), true);
    return;
  }
  const scan = await response.json();
  dup.scan = scan;
  dup.offset = offset;
  dup.page = scan.page;
  revokeIn($("dup-groups"));
  $("dup-groups").replaceChildren(...scan.page.map(groupItem));
  const what = scan.threshold === null ? "exact copies" : `cosine ≥ ${scan.threshold.toFixed(3)}`;
  say(
    "dup-status",
    scan.groups
      ? `${scan.groups} groups, ${scan.duplicates} duplicates (${humanBytes(scan.duplicate_bytes)}) among ` +
          `${scan.scanned} images, ${what}.`
      : `No duplicates among ${scan.scanned} images (${what}).`,
  );
  $("dup-bar").hidden = scan.groups === 0;
  $("dup-pager").hidden = scan.groups <= PAGE_GROUPS;
  $("dup-prev").disabled = offset === 0;
  $("dup-next").disabled = offset + PAGE_GROUPS >= scan.groups;
  const last = Math.min(offset + PAGE_GROUPS, scan.groups);
  $("dup-page").textContent = `groups ${offset + 1}–${last} of ${scan.groups}`;
}

// The file's folder and name ("…/2024/img.jpg"); the full path is in the title.
function shortPath(path) {
  const parts = path.split(/[\\/]/);
  return parts.length > 3 ? "…/" + parts.slice(-2).join("/") : path;
}

function choice(group) {
  if (!dup.choices.has(group.index)) dup.choices.set(group.index, { keeper: group.keeper.id, exclude: new Set() });
  return dup.choices.get(group.index);
}

// A new element with a class and a text.
function el(tag, className, text = "") {
  const node = document.createElement(tag);
  node.className = className;
  node.textContent = text;
  return node;
}

function groupItem(group) {
  const item = el("li", "group");
  item.dataset.index = String(group.index);
  const head = el("div", "group-head");
  const title = el("h3", "", `Group ${group.index + 1} · ${group.members.length + 1} images`);
  const move = button("Move others", () => planAction("move", [group.index]));
  move.className = "group-move";
  const remove = button("Delete others", () => planAction("delete", [group.index]));
  remove.className = "group-delete danger";
  head.append(title, move, remove);
  const list = document.createElement("ul");
  list.className = "members";
  const images = [{ ...group.keeper, score: 1, exact: true, direct: true }, ...group.members];
  for (const image of images) list.appendChild(memberItem(group, image, image.id === group.keeper.id));
  item.append(head, list);
  refreshGroup(item, group);
  return item;
}

function button(text, onClick) {
  const el = document.createElement("button");
  el.type = "button";
  el.textContent = text;
  el.addEventListener("click", onClick);
  return el;
}

function memberItem(group, image, original) {
  const item = document.createElement("li");
  item.className = "member";
  item.dataset.id = image.id;
  item.dataset.path = image.path;
  const img = document.createElement("img");
  img.alt = baseName(image.path);
  img.decoding = "async";
  const picture = document.createElement("div");
  picture.className = "picture";
  picture.appendChild(img);
  const keep = document.createElement("label");
  keep.className = "keep";
  const radio = document.createElement("input");
  radio.type = "radio";
  radio.name = `keeper-${group.index}`;
  radio.value = image.id;
  radio.checked = choice(group).keeper === image.id;
  radio.disabled = Boolean(image.done);
  radio.addEventListener("change", () => {
    choice(group).keeper = image.id;
    refreshGroup(item.closest(".group"), group);
  });
  keep.append(radio, document.createTextNode(" keep"));
  const act = document.createElement("label");
  act.className = "act";
  const box = document.createElement("input");
  box.type = "checkbox";
  box.checked = !choice(group).exclude.has(image.id);
  box.addEventListener("change", () => {
    if (box.checked) choice(group).exclude.delete(image.id);
    else choice(group).exclude.add(image.id);
  });
  act.append(box, document.createTextNode(" act on it"));
  const facts = document.createElement("div");
  facts.className = "facts";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = original ? "suggested keeper" : `cosine ${image.score.toFixed(4)}`;
  const notes = [];
  if (!original && image.exact) notes.push("exact copy");
  if (!image.direct) notes.push("linked via another duplicate: left alone");
  if (image.done) notes.push(image.done.action === "move" ? `moved to ${image.done.to}` : "deleted");
  const line = document.createElement("span");
  line.textContent = `${image.width}×${image.height} · ${humanBytes(image.size)} · ${dateText(image.mtime)}`;
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = shortPath(image.path);
  path.title = image.path;
  facts.append(score, line, path);
  if (notes.length) {
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = notes.join(" · ");
    facts.appendChild(note);
  }
  const controls = document.createElement("div");
  controls.className = "controls";
  controls.append(keep, act);
  item.append(picture, controls, facts);
  item.dataset.direct = String(image.direct);
  item.dataset.done = image.done ? "true" : "false";
  if (!image.done) loadThumbnail(img, image.thumbnail);
  else img.replaceWith(placeholder(notes[notes.length - 1]));
  return item;
}

// The chosen keeper is marked and cannot be acted on; members joined only through another one, or already
// moved or deleted, cannot be either.
function refreshGroup(item, group) {
  const keeper = choice(group).keeper;
  for (const member of item.querySelectorAll(".member")) {
    const isKeeper = member.dataset.id === keeper;
    member.classList.toggle("keeper", isKeeper);
    const box = member.querySelector(".act input");
    const fixed = member.dataset.done === "true" || (member.dataset.direct === "false" && keeper === group.keeper.id);
    box.disabled = isKeeper || fixed;
    if (box.disabled) box.checked = false;
    else box.checked = !choice(group).exclude.has(member.dataset.id);
  }
}

function selections(indices) {
  return indices.map((index) => {
    const group = dup.page.find((g) => g.index === index);
    const chosen = choice(group);
    const out = { group: index, exclude: [...chosen.exclude].filter((id) => id !== chosen.keeper) };
    if (chosen.keeper !== group.keeper.id) out.keeper = chosen.keeper;
    return out;
  });
}

async function planAction(kind, indices) {
  if (!dup.scan || !indices.length) return;
  const body = { action: kind, groups: selections(indices), dry_run: true };
  if (kind === "move") {
    // Left empty: the service's dedup.duplicates_dir (it answers what to give when that is not set).
    const target = $("dup-move-to").value.trim();
    if (target) body.move_to = target;
  }
  const response = await postJson(`duplicates/scans/${dup.scan.id}/actions`, body);
  if (!response.ok) {
    say("dup-status", await errorText(response), true);
    return;
  }
  showPlan(kind, body, await response.json());
}

function showPlan(kind, body, plan) {
  dup.pending = { ...body, dry_run: false, confirm: true, request_id: requestId() };
  const verb = kind === "move" ? "Move" : "Delete";
  $("plan-title").textContent = `Dry run: ${verb.toLowerCase()} ${plan.planned.length} files`;
  const where = kind === "move" ? ` to ${body.move_to || "the duplicates folder (dedup.duplicates_dir)"}` : "";
  $("plan-summary").textContent =
    `${verb} ${plan.planned.length} files (${humanBytes(plan.bytes)})${where}; keepers stay; ` +
    `${plan.skipped.length} left alone.`;
  const rows = [
    ...plan.planned.map((a) => `${a.action} ${a.path}` + (a.to ? ` → ${a.to}` : "")),
    ...plan.skipped.map((s) => `leave ${s.path}: ${s.reason}`),
    ...plan.already.map((a) => `already done: ${a.path}`),
  ];
  $("plan-list").replaceChildren(
    ...rows.map((text) => {
      const li = document.createElement("li");
      li.textContent = text;
      return li;
    }),
  );
  const deleting = kind === "delete";
  $("plan-confirm-row").hidden = !deleting;
  $("plan-confirm").checked = false;
  $("plan-apply").disabled = deleting || plan.planned.length === 0;
  $("plan-apply").textContent = deleting ? "Delete for good" : "Move";
  $("plan-dialog").returnValue = "";
  $("plan-dialog").showModal();
  $("plan-cancel").focus();
}

async function finishAction(answer) {
  const body = dup.pending;
  dup.pending = null;
  if (answer !== "apply" || !body) {
    say("dup-status", "Nothing was changed.");
    return;
  }
  if (body.action === "delete" && !$("plan-confirm").checked) return;
  say("dup-status", body.action === "move" ? "Moving…" : "Deleting…");
  const response = await postJson(`duplicates/scans/${dup.scan.id}/actions`, body);
  if (!response.ok) {
    say("dup-status", await errorText(response), true);
    return;
  }
  const result = await response.json();
  await loadGroups(dup.offset);
  const verb = body.action === "move" ? "moved" : "deleted";
  const problems = result.failed.length + result.skipped.filter((s) => s.problem).length;
  say(
    "dup-status",
    `${verb} ${result.done.length} files, ${result.failed.length} failed, ${result.skipped.length} left alone` +
      (problems ? ` (${problems} need a look: see the dry run's reasons)` : "") + ".",
    problems > 0,
  );
}

// --- clusters --------------------------------------------------------------------------------------------

function setUpClusters() {
  $("cl-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runClustering();
  });
}

async function runClustering() {
  const k = numberOrNull("cl-k");
  $("cl-run").disabled = true;
  say("cl-status", "Starting…");
  try {
    const response = await postJson("clusters/runs", k === null ? { auto: true } : { k });
    if (!response.ok) throw new Error(await errorText(response));
    const started = await response.json();
    const job = await pollJob(`clusters/runs/${started.id}`, "cl-progress", "cl-status", "Clustering");
    if (job.state === "failed") throw new Error(job.error);
    await loadClusters();
  } catch (e) {
    say("cl-status", e.message, true);
  } finally {
    $("cl-run").disabled = false;
  }
}

async function loadClusters() {
  const response = await call("clusters?central=6");
  if (!response.ok) {
    say("cl-status", await errorText(response), true);
    return;
  }
  const result = await response.json();
  revokeIn($("cl-rows"));
  $("cl-rows").replaceChildren(...result.clusters.map(clusterItem));
  const later = result.unclustered ? ` ${result.unclustered} images indexed since are in none.` : "";
  say(
    "cl-status",
    result.clusters.length
      ? `${result.clusters.length} clusters. Open one to search inside it.${later}`
      : "No clusters yet: run clustering (or `indexer cluster`).",
  );
}

function clusterItem(cluster) {
  const item = el("li", "cluster");
  item.dataset.id = String(cluster.id);
  const open = button("", () => openCluster(cluster));
  open.className = "cluster-open";
  open.setAttribute("aria-label", `Search inside cluster ${cluster.id} (${cluster.size} images)`);
  const title = el("span", "cluster-title", `Cluster ${cluster.id} · ${cluster.size} images`);
  const strip = el("span", "strip");
  for (const image of cluster.central) {
    const img = document.createElement("img");
    img.alt = baseName(image.path);
    img.title = image.path;
    strip.appendChild(img);
    loadThumbnail(img, image.thumbnail);
  }
  open.append(title, strip);
  item.appendChild(open);
  return item;
}

function openCluster(cluster) {
  const centre = cluster.central[0];
  state.cluster = { id: cluster.id };
  state.like = { id: centre.id, name: baseName(centre.path), thumbnail: centre.thumbnail };
  state.image = null;
  $("q").value = "";
  showView("search");
  showExamples();
  search();
}
