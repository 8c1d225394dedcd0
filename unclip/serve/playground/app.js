// The playground of `unclip serve`: plain JavaScript against the server's own API, nothing else.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "unclip-api-key";
let info = null;  // GET /v1/unclip/info: the model, its defaults and the server's limits

function headers(extra = {}) {
  const key = localStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorMessage(response) {
  // the server's envelope {"error": {"message": ...}}, else its status line
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) $("key-panel").hidden = false;
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

// -- the model's defaults and the server's state ---------------------------------------------------

async function loadInfo() {
  try {
    info = await (await api("/v1/unclip/info")).json();
  } catch (err) {
    $("model").textContent = "not connected";
    showError(err.message);
    return;
  }
  showError("");
  $("model").textContent = `${info.model} · ${info.size}`;
  const d = info.defaults, v = info.image_defaults;
  const stable = info.family === "stable-unclip";  // a latent UNet and a VAE: no super-resolution
  for (const el of document.querySelectorAll(".stable")) el.hidden = !stable;
  for (const el of document.querySelectorAll(".karlo")) el.hidden = stable;
  for (const [k, value] of Object.entries(d)) if ($(k) && k !== "use_prior") $(k).value = value ?? "";
  for (const [k, value] of Object.entries(v)) if ($(`vary-${k}`)) $(`vary-${k}`).value = value ?? "";
  if (v.decoder_steps !== undefined) $("interp-decoder_steps").value = v.decoder_steps;
  for (const id of ["n", "vary-n", "frames"]) $(id).max = info.limits.max_images;
  if (stable) for (const id of ["noise_level", "vary-noise_level"]) $(id).max = info.noise_levels - 1;
  const last = stable ? `, noise level ${d.noise_level}` : `, super-res ${d.super_res_steps}`;
  $("defaults").textContent = `Model defaults: prior ${d.prior_steps} steps at guidance ${d.prior_guidance}, ` +
    `decoder ${d.decoder_steps} at ${d.decoder_guidance}${last}` + (d.use_prior === false ? " (no prior)" : "") + ".";
  const offered = { generate: info.generations, vary: info.variations,
                    interpolate: info.variations && info.interpolations };
  for (const [tab, on] of Object.entries(offered)) document.querySelector(`[data-tab=${tab}]`).disabled = !on;
  if (!info.generations) document.querySelector("[data-tab=vary]").click();  // an image-variation model
}

function textField(id, name, into) {
  // a <select> or text: sent when not empty (the model's own default otherwise)
  const value = $(id).value.trim();
  if (value !== "") into[name] = value;
}

async function pollStatus() {
  try {
    const s = await (await api("/v1/unclip/status")).json();
    const p50 = s.recent.p50_s === null ? "–" : `${s.recent.p50_s.toFixed(2)} s`;
    const p90 = s.recent.p90_s === null ? "–" : `${s.recent.p90_s.toFixed(2)} s`;
    $("status").textContent = `queue ${s.queue_depth} · running ${s.in_flight} · ` +
      `recent latency p50 ${p50}, p90 ${p90} (${s.recent.requests} requests)`;
  } catch (_) {
    $("status").textContent = "";
  }
}

// -- requests --------------------------------------------------------------------------------------

function seedOf(id) {
  // the page draws a seed when none is given: one that JavaScript's numbers hold exactly (the
  // server's own random seeds go up to 2^63), so that "reuse seed" gives the same image again
  const value = $(id).value.trim();
  return value === "" ? Math.floor(Math.random() * 2 ** 32) : Number(value);
}

function numberField(id, name, into) {
  const value = $(id).value.trim();
  if (value !== "") into[name] = Number(value);
}

async function* sseEvents(response) {
  // Server-Sent Events from a fetch body: yields {event, data}
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function setBusy(button, busy) {
  button.disabled = busy;
  button.dataset.label = button.dataset.label || button.textContent;
  button.textContent = busy ? "Working…" : button.dataset.label;
}

async function runStreamed(button, response, describe) {
  // previews into #preview as they come, then one gallery card per image
  const preview = $("preview");
  preview.dataset.partials = "0";
  let done = 0, last = null;
  for await (const { event, data } of sseEvents(response)) {
    if (event === "error") throw new Error(data.error.message);
    if (data.type === "image_generation.partial_image") {
      preview.hidden = false;
      $("preview-image").src = `data:image/png;base64,${data.b64_json}`;
      preview.dataset.partials = String(Number(preview.dataset.partials) + 1);
      $("preview-caption").textContent = `preview ${data.partial_image_index + 1}` +
        (data.image_index ? ` (image ${data.image_index + 1})` : "");
    } else if (data.type === "image_generation.completed") {
      last = addCard(data.b64_json, { ...describe, seed: data.seed, index: data.image_index }, last);
      done += 1;
    }
  }
  if (!done) throw new Error("the stream ended without an image; retry");
  preview.hidden = true;
}

async function submit(button, path, body, describe, streamed) {
  showError("");
  setBusy(button, true);
  try {
    const isForm = body instanceof FormData;
    const response = await api(path, {
      method: "POST",
      headers: isForm ? {} : { "Content-Type": "application/json" },
      body: isForm ? body : JSON.stringify(body),
    });
    if (streamed) {
      await runStreamed(button, response, describe);
    } else {
      const result = await response.json();
      return result;
    }
  } catch (err) {
    showError(err.message);
    $("preview").hidden = true;
  } finally {
    setBusy(button, false);
    pollStatus();
  }
  return null;
}

// -- the gallery -----------------------------------------------------------------------------------

function addCard(b64, { title, seed, index, reuse }, after = null) {
  // newest request first; a request's images in their order (each after the one before)
  const card = document.createElement("figure");
  card.className = "card";
  const img = document.createElement("img");
  img.className = "result";
  img.alt = title;
  img.src = `data:image/png;base64,${b64}`;
  img.dataset.seed = String(seed);
  const caption = document.createElement("figcaption");
  caption.textContent = `${title} · seed ${seed}` + (index ? ` · #${index + 1}` : "");
  const actions = document.createElement("div");
  actions.className = "actions";
  const download = document.createElement("a");
  download.href = img.src;  // the server's PNG as sent: its text chunks (prompt, seed, settings) kept
  download.download = `unclip-${seed}-${index || 0}.png`;
  download.textContent = "Download";
  actions.append(download);
  if (reuse) {
    const again = document.createElement("button");
    again.type = "button";
    again.className = "reuse";
    again.textContent = "Reuse seed";
    again.addEventListener("click", () => reuse(seed));
    actions.append(again);
  }
  card.append(img, caption, actions);
  if (after) after.after(card); else $("gallery").prepend(card);
  return card;
}

// -- the three forms -------------------------------------------------------------------------------

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("prompt").value;
  const body = { prompt, stream: true, seed: seedOf("seed") };
  numberField("n", "n", body);
  numberField("partial_images", "partial_images", body);
  for (const k of ["prior_steps", "decoder_steps", "super_res_steps", "prior_guidance", "decoder_guidance"]) {
    if (!$(k).closest("label").hidden) numberField(k, k, body);
  }
  if (info && info.family === "stable-unclip") {
    numberField("noise_level", "noise_level", body);
    textField("scheduler", "scheduler", body);
  }
  const reuse = (seed) => { $("prompt").value = prompt; $("seed").value = seed; };
  await submit($("generate"), "/v1/images/generations", body, { title: prompt, reuse }, true);
});

let varyFile = null;
function chooseImage(file) {
  if (!file) return;
  varyFile = file;
  const thumb = $("vary-thumb");
  thumb.src = URL.createObjectURL(file);
  thumb.hidden = false;
  $("drop-hint").textContent = file.name;
}
$("vary-image").addEventListener("change", () => chooseImage($("vary-image").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  chooseImage(e.dataTransfer.files[0]);
});

$("vary-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!varyFile) { showError("choose or drop an image first"); return; }
  const form = new FormData();
  form.append("image", varyFile);
  form.append("stream", "true");
  form.append("seed", String(seedOf("vary-seed")));
  for (const k of ["n", "partial_images", "decoder_steps", "super_res_steps", "decoder_guidance", "noise_level",
                   "scheduler"]) {
    const field = $(`vary-${k}`), value = field.value.trim();
    if (value !== "" && !field.closest("label").hidden) form.append(k, value);
  }
  const reuse = (seed) => { $("vary-seed").value = seed; };
  await submit($("vary"), "/v1/images/variations", form, { title: `variation of ${varyFile.name}`, reuse }, true);
});

let frames = [];
function showFrame(i) {
  $("frame").src = `data:image/png;base64,${frames[i]}`;
  $("frame-label").textContent = `${i + 1} of ${frames.length}`;
}
$("frame-slider").addEventListener("input", () => showFrame(Number($("frame-slider").value)));

$("interpolate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  for (const end of ["a", "b"]) {
    const file = $(`${end}-image`).files[0];
    const text = $(`${end}-prompt`).value;
    if (file) form.append(end, file);
    else form.append(end, text);
  }
  form.append("seed", String(seedOf("interp-seed")));
  for (const [id, name] of [["frames", "frames"], ["interp-decoder_steps", "decoder_steps"]]) {
    const value = $(id).value.trim();
    if (value !== "") form.append(name, value);
  }
  const result = await submit($("interpolate"), "/v1/unclip/interpolations", form, {}, false);
  if (!result) return;
  frames = result.data.map((d) => d.b64_json);
  $("frame-slider").max = String(frames.length - 1);
  $("frame-slider").value = "0";
  $("frames-view").hidden = false;
  showFrame(0);
});

// -- tabs, key, start ------------------------------------------------------------------------------

for (const tab of document.querySelectorAll("[data-tab]")) {
  tab.addEventListener("click", () => {
    for (const t of document.querySelectorAll("[data-tab]")) t.setAttribute("aria-selected", String(t === tab));
    for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== tab.dataset.tab;
  });
}
$("key-toggle").addEventListener("click", () => { $("key-panel").hidden = !$("key-panel").hidden; });
$("key-save").addEventListener("click", () => {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem(KEY, key); else localStorage.removeItem(KEY);
  $("key-panel").hidden = true;
  loadInfo();
  pollStatus();
});

loadInfo();
pollStatus();
setInterval(pollStatus, 3000);
