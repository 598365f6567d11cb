// fluxkit web UI: a thin client of the Replicate-style API (POST /v1/predictions, its event stream, cancel).
"use strict";

const $ = (id) => document.getElementById(id);
const LIVE_DEBOUNCE_MS = 350;
const state = { models: {}, current: null, liveTimer: null, liveCard: null };

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = $("token").value || localStorage.getItem("fluxkit-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

async function api(path, body) {
  const opts = body === undefined ? { headers: headers(false) } :
    { method: "POST", headers: headers(true), body: JSON.stringify(body) };
  const res = await fetch(path, opts);
  if (res.status === 401) {
    $("auth").open = true;
    throw new Error("this server needs an API token (see below)");
  }
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(data.detail || (data.error && data.error.message) || res.statusText);
  return data;
}

async function init() {
  $("token").value = localStorage.getItem("fluxkit-token") || "";
  try {
    const models = await api("/v1/models");
    for (const m of models.data) {
      state.models[m.id] = m;
      $("model").add(new Option(m.id, m.id));
    }
    const info = await api("/v1/info");
    for (const name of info.loras) $("lora").add(new Option(name, name));
    modelChanged();
    setStatus("ready");
  } catch (e) {
    showError(e);
  }
}

function modelChanged() {
  const m = state.models[$("model").value];
  if (!m) return;
  $("steps").placeholder = m.default_steps;
  $("guidance").disabled = !m.guidance;
  $("guidance").placeholder = m.guidance ? m.default_guidance : "n/a for this model";
  if (!m.guidance) $("guidance").value = "";
}

function numberField(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function readInput() {
  const input = { prompt: $("prompt").value, aspect_ratio: $("aspect_ratio").value, output_format: "png" };
  const fields = { num_inference_steps: numberField("steps"), guidance: numberField("guidance"),
                   seed: numberField("seed"), true_cfg: numberField("true_cfg") };
  for (const [k, v] of Object.entries(fields)) if (v !== undefined) input[k] = v;
  if ($("negative_prompt").value.trim()) input.negative_prompt = $("negative_prompt").value;
  if ($("lora").value) {
    input.lora_weights = $("lora").value;
    input.lora_scale = numberField("lora_scale") ?? 1;
  }
  return input;
}

function setStatus(text) { $("status").textContent = text; }
function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }
function setProgress(pct) { $("progress").value = pct; }

async function generate(live) {
  showError(null);
  if (!$("prompt").value.trim()) return;
  if (state.current) await cancel();
  const input = readInput();
  let pred;
  try {
    pred = await api("/v1/predictions", { version: $("model").value, input });
  } catch (e) {
    showError(e);
    return;
  }
  const job = { id: pred.id, input, model: $("model").value, live, started: performance.now(), canceled: false };
  state.current = job;
  $("cancel").disabled = false;
  setProgress(0);
  setStatus("queued");
  try {
    const result = await follow(pred, job);
    if (result.status === "succeeded") addResults(job, result);
    else if (result.status === "failed") showError(result.error);
    setStatus(result.status);
  } catch (e) {
    if (!job.canceled) showError(e);
  } finally {
    if (state.current === job) {
      state.current = null;
      $("cancel").disabled = true;
    }
  }
}

// Follow a prediction through its event stream; -> {status, output, error, seed}.
async function follow(pred, job) {
  const res = await fetch(pred.urls.stream, { headers: headers(false) });
  if (!res.ok || !res.body) throw new Error("progress stream failed: " + res.status);
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  const result = { status: "processing", output: [], error: null, seed: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const raw = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const ev = { event: "message", data: [] };
      for (const line of raw.split("\n")) {
        const i = line.indexOf(":");
        if (i > 0 && line.slice(0, i) === "event") ev.event = line.slice(i + 1).trim();
        if (i > 0 && line.slice(0, i) === "data") ev.data.push(line.slice(i + 1).replace(/^ /, ""));
      }
      if (handleEvent(ev.event, ev.data.join("\n"), result)) return result;
    }
  }
  return result;
}

function handleEvent(kind, data, result) {
  if (kind === "logs") {
    const seed = /Using seed: (\d+)/.exec(data);
    if (seed) result.seed = Number(seed[1]);
    const m = /(\d+)%\|.*\| (\d+)\/(\d+)/.exec(data);
    if (m) {
      setProgress(Number(m[1]));
      setStatus(`step ${m[2]} of ${m[3]}`);
    }
  } else if (kind === "output") {
    result.output.push(data);
  } else if (kind === "error") {
    result.error = data;
  } else if (kind === "done") {
    const reason = JSON.parse(data || "{}").reason;
    result.status = reason === "canceled" ? "canceled" : reason === "error" ? "failed" : "succeeded";
    if (result.status === "succeeded") setProgress(100);
    return true;
  }
  return false;
}

async function cancel() {
  const job = state.current;
  if (!job) return;
  job.canceled = true;
  state.current = null;
  $("cancel").disabled = true;
  try { await api(`/v1/predictions/${job.id}/cancel`, {}); } catch (e) { /* finished meanwhile */ }
}

function addResults(job, result) {
  const seconds = ((performance.now() - job.started) / 1000).toFixed(2);
  result.output.forEach((url, k) => {
    const seed = result.seed !== null ? result.seed + k : "";
    const params = { prompt: job.input.prompt, model: job.model, seed, aspect: job.input.aspect_ratio,
                     steps: job.input.num_inference_steps ?? state.models[job.model].default_steps,
                     guidance: job.input.guidance ?? "", lora: job.input.lora_weights ?? "",
                     negative: job.input.negative_prompt ?? "", time: seconds + " s" };
    const card = document.createElement("figure");
    card.className = "card" + (job.live ? " live" : "");
    card.dataset.prediction = job.id;
    const img = document.createElement("img");
    img.src = url;
    img.alt = job.input.prompt;
    const dl = document.createElement("dl");
    for (const [k, v] of Object.entries(params)) {
      if (v === "") continue;
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v; dd.dataset.param = k;
      dl.append(dt, dd);
    }
    const link = document.createElement("a");
    link.href = url;
    link.download = `fluxkit-${seed}.${url.split(".").pop()}`;
    link.textContent = "Download";
    card.append(img, dl, link);
    // Live mode keeps one card that each new result replaces; other results are added in front.
    if (job.live && state.liveCard && state.liveCard.isConnected) state.liveCard.replaceWith(card);
    else $("gallery").prepend(card);
    if (job.live) state.liveCard = card;
  });
}

function liveChanged() {
  if (!$("live").checked) return;
  clearTimeout(state.liveTimer);
  state.liveTimer = setTimeout(() => generate(true), LIVE_DEBOUNCE_MS);
}

$("form").addEventListener("submit", (e) => { e.preventDefault(); generate(false); });
$("cancel").addEventListener("click", () => { cancel(); setStatus("canceled"); });
$("model").addEventListener("change", modelChanged);
$("token").addEventListener("change", () => localStorage.setItem("fluxkit-token", $("token").value));
for (const id of ["prompt", "negative_prompt", "aspect_ratio", "steps", "guidance", "seed", "lora", "lora_scale"]) {
  $(id).addEventListener("input", liveChanged);
}
$("live").addEventListener("change", liveChanged);
init();
