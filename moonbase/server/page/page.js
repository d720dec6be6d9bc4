// The moonbase playground: one image, one skill, the answer streamed, the boxes, points and masks drawn.
// Plain browser JavaScript, no build step. Every URL is relative, so the page works behind a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { image: null, models: [] };

// --- talking to the API ---------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key; // a header, never the URL
  return h;
}

function api(path, options = {}) {
  return fetch("v1/" + path, { ...options, headers: headers() });
}

async function errorOf(res) {
  try {
    const body = await res.json();
    return (body.error && body.error.message) || body.detail || `${res.status} ${res.statusText}`;
  } catch (_) {
    return `${res.status} ${res.statusText}`;
  }
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

// --- models and finetunes -------------------------------------------------------------------------

async function loadModels() {
  const res = await api("models");
  if (res.status === 401) {
    $("settings").open = true;
    $("api-key").focus();
    showError("This server needs an API key: enter it under Settings.");
    return;
  }
  if (!res.ok) return showError(await errorOf(res));
  showError("");
  state.models = (await res.json()).data;
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  const base = state.models.length ? state.models[0].id : "";
  for (const checkpoint of await finetuneCheckpoints(base)) select.add(new Option(checkpoint, checkpoint));
  $("model-name").textContent = base;
  modelChanged();
}

async function finetuneCheckpoints(base) {
  const res = await api("tuning/finetunes");
  if (!res.ok) return []; // the tuning API is off
  const names = [];
  for (const f of (await res.json()).finetunes || []) {
    const r = await api(`tuning/finetunes/${encodeURIComponent(f.finetune_id || f.id)}/checkpoints`);
    if (!r.ok) continue;
    for (const c of (await r.json()).checkpoints || []) names.push(`${base}/${f.finetune_id || f.id}@${c.step}`);
  }
  return names;
}

function modelChanged() {
  const chosen = state.models.find((m) => m.id === $("model").value.split("/")[0]) || state.models[0];
  const skills = (chosen && chosen.skills) || ["caption", "query", "detect", "point"];
  for (const option of $("skill").options) option.disabled = !skills.includes(option.value);
  if ($("skill").selectedOptions[0].disabled) $("skill").value = "caption";
  skillChanged();
}

function skillChanged() {
  const skill = $("skill").value;
  $("length").hidden = skill !== "caption";
  $("reasoning-label").hidden = skill !== "query";
  $("prompt").hidden = skill === "caption";
  $("prompt").placeholder = skill === "query" ? "a question" : "an object, e.g. person";
}

// --- the image ------------------------------------------------------------------------------------

function readFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.onerror = () => showError("Could not read that file.");
  reader.readAsDataURL(file);
}

function setImage(url) {
  const img = $("preview");
  img.onload = () => {
    state.image = url;
    $("stage").hidden = false;
    $("drop-hint").hidden = true;
    clearResults();
  };
  img.onerror = () => {
    state.image = null;
    $("stage").hidden = true;
    $("drop-hint").hidden = false;
    clearResults();
    showError("That file is not an image this browser can read (PNG, JPEG, WebP or GIF).");
  };
  img.src = url;
}

// --- results --------------------------------------------------------------------------------------

function clearResults() {
  showError("");
  $("overlay").replaceChildren();
  for (const id of ["answer", "reasoning-text", "stats", "count"]) $(id).textContent = "";
}

const pct = (v) => `${(100 * v).toFixed(3)}%`;

function addBox(b, label, ground) {
  const el = document.createElement("div");
  el.dataset.kind = "box";
  if (ground !== undefined) el.dataset.ground = ground;
  Object.assign(el.style, { left: pct(b.x_min), top: pct(b.y_min), width: pct(b.x_max - b.x_min), height: pct(b.y_max - b.y_min) });
  if (label) {
    const tag = document.createElement("span");
    tag.className = "label";
    tag.textContent = label;
    el.appendChild(tag);
  }
  $("overlay").appendChild(el);
  return el;
}

function addPoint(p, ground) {
  const el = document.createElement("div");
  el.dataset.kind = "point";
  if (ground !== undefined) el.dataset.ground = ground;
  Object.assign(el.style, { left: pct(p.x), top: pct(p.y) });
  $("overlay").appendChild(el);
}

function mask() {
  let path = $("overlay").querySelector('[data-kind="mask"]');
  if (!path) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 1 1");
    svg.setAttribute("preserveAspectRatio", "none");
    path = document.createElementNS(ns, "path");
    path.dataset.kind = "mask";
    svg.appendChild(path);
    $("overlay").appendChild(svg);
  }
  return path;
}

function showCount(n, noun) {
  $("count").textContent = `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function showStats(s) {
  if (!s) return;
  const image = s.image_tokens ? ` + ${s.image_tokens} image${s.image_cached ? " (cached)" : ""}` : "";
  const ms = (v) => (v == null ? "-" : `${Math.round(v)} ms`);
  $("stats").textContent =
    `${s.input_tokens} tokens in${image} · ${s.output_tokens} out · first token ${ms(s.ttft_ms)} · total ${ms(s.total_ms)}`;
}

function showReasoning(r) {
  const box = $("reasoning-text");
  box.replaceChildren();
  let at = 0;
  (r.grounding || []).forEach((g, k) => {
    box.append(r.text.slice(at, g.start_idx));
    const span = document.createElement("span");
    span.className = "ground";
    span.dataset.ground = k;
    span.textContent = r.text.slice(g.start_idx, g.end_idx);
    span.addEventListener("mouseenter", () => light(k, true));
    span.addEventListener("mouseleave", () => light(k, false));
    box.append(span);
    for (const p of g.points || []) addPoint(p, k);
    at = g.end_idx;
  });
  box.append(r.text.slice(at));
}

function light(k, on) {
  for (const el of $("overlay").querySelectorAll(`[data-ground="${k}"]`)) el.classList.toggle("lit", on);
}

function render(skill, body, out) {
  if (skill === "detect") {
    out.objects.forEach((o) => addBox(o, body.object));
    showCount(out.objects.length, "object");
  } else if (skill === "point") {
    out.points.forEach((p) => addPoint(p));
    showCount(out.points.length, "point");
  }
  showStats(out._stats);
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
    }
  }
}

function onTextEvent(ev) {
  if (ev.error) return showError(ev.error.message || String(ev.error));
  if (ev.chunk) $("answer").textContent += ev.chunk;
  if (ev.completed) {
    if (ev.reasoning) showReasoning(ev.reasoning);
    showStats(ev._stats);
  }
}

function onSegmentEvent(body) {
  let path = "";
  return (ev) => {
    if (ev.type === "error") return showError(ev.error.message || String(ev.error));
    if (ev.type === "bbox" && ev.bbox) addBox(ev.bbox, body.object).style.borderStyle = "dashed";
    if (ev.type === "path_delta") mask().setAttribute("d", (path += ev.chunk));
    if (ev.type === "final") {
      if (ev.path) mask().setAttribute("d", ev.path);
      showCount(ev.path ? 1 : 0, "mask");
    }
  };
}

// --- running a request ----------------------------------------------------------------------------

function settings() {
  const out = {};
  for (const key of ["temperature", "top_p", "max_tokens", "max_objects"]) {
    const v = $(key).value;
    if (v !== "") out[key] = Number(v);
  }
  return out;
}

async function run(event) {
  event.preventDefault();
  clearResults();
  const skill = $("skill").value;
  const prompt = $("prompt").value.trim();
  if (!state.image) return showError("Choose an image first.");
  if (skill !== "caption" && !prompt) return showError(skill === "query" ? "Type a question." : "Type an object.");
  const body = { image_url: state.image, settings: settings() };
  if ($("model").value) body.model = $("model").value;
  if (skill === "caption") Object.assign(body, { length: $("length").value, stream: true });
  if (skill === "query") Object.assign(body, { question: prompt, reasoning: $("reasoning").checked, stream: true });
  if (skill === "detect" || skill === "point") body.object = prompt;
  if (skill === "segment") Object.assign(body, { object: prompt, stream: true });
  $("run").disabled = true;
  try {
    const res = await api(skill, { method: "POST", body: JSON.stringify(body) });
    if (!res.ok) return showError(await errorOf(res));
    if (!body.stream) return render(skill, body, await res.json());
    await readEvents(res, skill === "segment" ? onSegmentEvent(body) : onTextEvent);
  } catch (e) {
    showError(`The request failed: ${e.message}`);
  } finally {
    $("run").disabled = false;
  }
}

// --- wiring ---------------------------------------------------------------------------------------

$("image-input").addEventListener("change", (e) => readFile(e.target.files[0]));
$("ask").addEventListener("submit", run);
$("skill").addEventListener("change", skillChanged);
$("model").addEventListener("change", modelChanged);
$("api-key").addEventListener("change", loadModels);
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  readFile(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {
  const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
  if (item) readFile(item.getAsFile());
});
skillChanged();
loadModels();
