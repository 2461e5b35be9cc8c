// llm_module playground: plain JavaScript over the service's own HTTP API (/v1/...).
// No libraries and no build step. Served at /ui/ (or /t/<token>/ui/); API paths are taken
// relative to the page's parent, so a /t/<token>/ prefix in the address carries over.
"use strict";

const API_BASE = new URL("../", location.href);
const TOKEN_KEY = "llm_module.token";
const ACTIVE_JOB_STATES = ["queued", "running", "cancelling"];
const JOB_POLL_MS = 700;

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  tokenPrompt: null, // the pending "ask for the token" promise, shared by concurrent calls
  model: null,
  settings: null,
  adapters: [],
  conversations: { a: [], b: [] }, // chat mode: the turns so far, one per output column
  abort: null,
  watchedJob: null,
  jobTimer: null,
};

// ------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", json, raw, signal } = {}) {
  for (;;) {
    const headers = {};
    let body;
    if (state.token) headers.Authorization = `Bearer ${state.token}`;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (raw !== undefined) {
      headers["Content-Type"] = "application/octet-stream";
      body = raw;
    }
    const response = await fetch(new URL(path, API_BASE), { method, headers, body, signal });
    if (response.status !== 401) return response;
    const message = state.token ? "That token was refused; check it and try again." : "";
    await askForToken(message);
  }
}

async function apiJson(path, options) {
  const response = await api(path, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    const message = data && data.error ? data.error.message : `${response.status} ${response.statusText}`;
    throw new ApiError(message, response.status);
  }
  return data;
}

function askForToken(message) {
  if (!state.tokenPrompt) {
    state.tokenPrompt = new Promise((resolve) => {
      const dialog = $("token-dialog");
      $("token-error").textContent = message;
      $("token-input").value = "";
      dialog.addEventListener("close", function onClose() {
        dialog.removeEventListener("close", onClose);
        state.token = $("token-input").value.trim() || null;
        if (state.token) sessionStorage.setItem(TOKEN_KEY, state.token);
        $("forget-token").hidden = !state.token;
        state.tokenPrompt = null;
        resolve();
      });
      dialog.showModal();
    });
  }
  return state.tokenPrompt;
}

function forgetToken() {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  location.reload();
}

// Server-sent events over fetch (EventSource cannot POST): calls onPiece per piece, returns the whole text.
async function streamGenerate(body, onPiece, signal) {
  const response = await api("v1/generate/stream", { method: "POST", json: body, signal });
  if (!response.ok) {
    const data = await response.json().catch(() => null);
    throw new ApiError(data && data.error ? data.error.message : response.statusText, response.status);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError("The stream ended before the server said it was done.", 0);
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event.type === "message") onPiece(event.data.text);
      else if (event.type === "done") return event.data.text;
      else if (event.type === "error") throw new ApiError(event.data.error.message, event.data.error.status);
    }
  }
}

function parseEvent(block) {
  let type = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) type = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  return { type, data: data ? JSON.parse(data) : {} };
}

// ------------------------------------------------------------------ formatting
function formatBytes(bytes) {
  if (bytes == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function formatDuration(seconds) {
  if (seconds == null || !isFinite(seconds)) return "–";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, "0")} s`;
  return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
}

function formatTime(epochSeconds) {
  if (!epochSeconds) return "–";
  return new Date(epochSeconds * 1000).toLocaleString([], { dateStyle: "short", timeStyle: "short" });
}

function formatNumber(value, digits = 4) {
  if (value == null) return "–";
  if (Math.abs(value) >= 1000) return Math.round(value).toLocaleString();
  return String(Number(Number(value).toPrecision(digits)));
}

// A path under the data root is shown relative to it; any other path by its last two parts (hover: all of it).
function shortPath(path) {
  if (!path) return element("span", {}, "–");
  const root = state.dataRoot ? state.dataRoot.replace(/\/+$/, "") + "/" : null;
  let shown = path;
  if (root && path.startsWith(root)) shown = path.slice(root.length);
  else if (path.startsWith("/")) shown = "…/" + path.split("/").slice(-2).join("/");
  return element("span", { title: path }, shown);
}

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "className") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function showError(id, error) {
  $(id).textContent = error ? error.message || String(error) : "";
}

// ------------------------------------------------------------------ tabs
function selectTab(tab) {
  for (const other of document.querySelectorAll('[role="tab"]')) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      selectTab(next);
      next.focus();
    });
  }
}

// ------------------------------------------------------------------ model, settings, adapters, files
async function loadModel(retrying = false) {
  const status = $("model-status");
  try {
    state.model = await apiJson("v1/model");
  } catch (error) {
    status.textContent = `Cannot reach the service: ${error.message}`;
    status.className = "model-status bad";
    setTimeout(() => loadModel(true), 3000);
    return;
  }
  if (!state.model.ready) {
    status.textContent = "Loading the model…";
    status.className = "model-status";
    setTimeout(() => loadModel(true), 1500);
    return;
  }
  const m = state.model;
  const params = m.parameters ? ` · ${(m.parameters / 1e6).toFixed(1)}M parameters` : "";
  status.textContent = `${m.model} · ${m.device} · ${m.dtype}${params}`;
  status.className = "model-status ok";
  $("forget-token").hidden = !state.token;
  if (retrying) await refreshAdapters(); // the start-up adapters are loaded with the model
}

async function loadSettings() {
  state.settings = await apiJson("v1/settings");
  $("max-new-tokens").max = state.settings.max_new_tokens;
}

async function refreshAdapters() {
  try {
    state.adapters = await apiJson("v1/adapters");
    showError("adapters-error", null);
  } catch (error) {
    showError("adapters-error", error);
    return;
  }
  fillAdapterSelect($("adapter-a"));
  fillAdapterSelect($("adapter-b"));
  fillAdapterSelect($("evaluate-adapter"));
  renderAdapterTable();
}

function fillAdapterSelect(select) {
  const previous = select.value;
  const options = [element("option", { value: "base" }, "base (no adapter)")];
  for (const adapter of state.adapters) {
    const label = adapter.default ? `${adapter.name} (default)` : adapter.name;
    options.push(element("option", { value: adapter.name }, label));
  }
  select.replaceChildren(...options);
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  else if (select.id === "adapter-b" && state.adapters.length) select.value = state.adapters[0].name;
}

function renderAdapterTable() {
  const rows = state.adapters.map((adapter) => element("tr", {},
    element("th", { scope: "row" }, adapter.name, adapter.default ? element("span", { className: "badge" }, "default") : ""),
    element("td", {}, shortPath(adapter.base_model)),
    element("td", { className: "nowrap" }, formatBytes(adapter.size_bytes)),
    element("td", { className: "nowrap" }, formatTime(adapter.trained_at)),
    element("td", { className: "path" }, shortPath(adapter.path)),
    element("td", { className: "row-actions" },
      element("button", { type: "button", onclick: () => useAdapter(adapter.name), "aria-label": `Try ${adapter.name}` }, "Try"),
      element("button", { type: "button", onclick: () => evaluateAdapter(adapter.name), "aria-label": `Evaluate ${adapter.name}` }, "Evaluate"),
      element("button", { type: "button", onclick: () => exportAdapter(adapter.name), "aria-label": `Export ${adapter.name}` }, "Export"),
      adapter.default
        ? element("button", { type: "button", onclick: () => setDefaultAdapter(null), "aria-label": `Stop using ${adapter.name} by default` }, "Not default")
        : element("button", { type: "button", onclick: () => setDefaultAdapter(adapter.name), "aria-label": `Make ${adapter.name} the default` }, "Make default"),
      element("button", { type: "button", className: "danger", onclick: () => unloadAdapter(adapter.name), "aria-label": `Unload ${adapter.name}` }, "Unload"),
    ),
  ));
  if (!rows.length) rows.push(element("tr", {}, element("td", { colspan: "6", className: "empty" }, "No adapters loaded: train one, or load one below.")));
  $("adapters-table").tBodies[0].replaceChildren(...rows);
}

async function unloadAdapter(name) {
  if (!confirm(`Unload adapter ${name}? Its files stay on disk.`)) return;
  try {
    await apiJson(`v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
  } catch (error) {
    showError("adapters-error", error);
  }
  await refreshAdapters();
}

async function setDefaultAdapter(name) {
  try {
    await apiJson("v1/adapters/default", { method: "PUT", json: { name } });
  } catch (error) {
    showError("adapters-error", error);
  }
  await refreshAdapters();
}

function useAdapter(name) {
  $("adapter-a").value = name;
  selectTab($("tab-generate"));
  $("prompt").focus();
}

async function exportAdapter(name) {
  const format = $("export-format").value;
  const status = $("export-status");
  showError("adapters-error", null);
  status.textContent = `Exporting ${name} as ${format}…`;
  try {
    const result = await apiJson("v1/export", { method: "POST", json: { adapter: name, output_dir: `exports/${name}-${format}`, format, overwrite: true } });
    const files = result.files.map((f) => `${f.file} (${formatBytes(f.bytes)})`).join(", ");
    status.textContent = `Exported ${name} to ${result.output_dir} in ${formatNumber(result.seconds, 3)} s: ${files}.`;
  } catch (error) {
    status.textContent = "";
    showError("adapters-error", error);
  }
}

function evaluateAdapter(name) {
  $("evaluate-adapter").value = name;
  $("evaluate-file").focus();
}

async function refreshFiles() {
  let listing;
  try {
    listing = await apiJson("v1/files");
  } catch (error) {
    $("upload-status").textContent = `Cannot list files: ${error.message}`;
    return;
  }
  $("data-files").replaceChildren(...listing.data_files.map((f) => element("option", { value: f.path }, formatBytes(f.size_bytes))));
  $("adapter-dirs").replaceChildren(...listing.adapter_dirs.map((d) => element("option", { value: d.path })));
  $("upload-hint").textContent = `(.json, .jsonl, .csv, .txt; up to ${formatBytes(listing.max_upload_bytes)})`;
  state.maxUploadBytes = listing.max_upload_bytes;
  if (listing.data_root !== state.dataRoot) {
    state.dataRoot = listing.data_root;
    renderAdapterTable();
  }
}

// ------------------------------------------------------------------ generate
function chatMode() {
  return document.querySelector('input[name="mode"]:checked').value === "chat";
}

function samplingOptions() {
  const options = { max_new_tokens: Number($("max-new-tokens").value) };
  const sample = $("do-sample").checked;
  options.do_sample = sample;
  if (sample) {
    for (const [id, key] of [["temperature", "temperature"], ["top-p", "top_p"], ["top-k", "top_k"]]) {
      if ($(id).value !== "") options[key] = Number($(id).value);
    }
    if ($("seed").value !== "") options.seed = Number($("seed").value);
  }
  if ($("repetition-penalty").value !== "") options.repetition_penalty = Number($("repetition-penalty").value);
  return options;
}

function updateModeControls() {
  const chat = chatMode();
  for (const node of document.querySelectorAll(".chat-only")) node.hidden = !chat;
  $("prompt-label").textContent = chat ? "Message" : "Prompt";
  $("prompt").placeholder = chat ? "Ask something…" : "Once upon a time";
  newConversation();
}

function updateCompareControls() {
  const compare = $("compare").checked;
  $("adapter-b").disabled = !compare;
  $("output-b").hidden = !compare;
  $("outputs").classList.toggle("two", compare);
  newConversation();
}

function newConversation() {
  state.conversations = { a: [], b: [] };
  for (const side of ["a", "b"]) {
    $(`output-${side}-text`).replaceChildren();
    $(`output-${side}-stats`).textContent = "";
  }
  showError("generate-error", null);
}

async function generate(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim()) return;
  const sides = $("compare").checked ? ["a", "b"] : ["a"];
  const chat = chatMode();
  state.abort = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  showError("generate-error", null);
  try {
    // One side after the other: the model serves one stream at a time, and the first side shows sooner.
    for (const side of sides) await generateOne(side, prompt, chat, state.abort.signal);
    if (chat) $("prompt").value = "";
  } catch (error) {
    if (error.name !== "AbortError") showError("generate-error", error);
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    state.abort = null;
  }
}

async function generateOne(side, prompt, chat, signal) {
  const adapter = $(`adapter-${side}`).value;
  const title = $(`output-${side}`).querySelector(".output-title");
  title.textContent = adapter === "base" ? "base" : adapter;
  const box = $(`output-${side}-text`);
  const stats = $(`output-${side}-stats`);
  const body = { adapter, ...samplingOptions() };
  let target;
  if (chat) {
    const conversation = state.conversations[side];
    body.messages = [...conversation, { role: "user", content: prompt }];
    if ($("system-prompt").value.trim()) body.messages.unshift({ role: "system", content: $("system-prompt").value.trim() });
    box.append(element("p", { className: "turn user" }, element("strong", {}, "You: "), prompt));
    target = element("span", { className: "generated" });
    box.append(element("p", { className: "turn assistant" }, element("strong", {}, "Model: "), target));
  } else {
    body.prompt = prompt;
    target = element("span", { className: "generated" });
    box.replaceChildren(element("span", { className: "prompt-echo" }, prompt), target);
  }
  box.setAttribute("aria-busy", "true");
  box.classList.add("streaming");
  stats.textContent = "Waiting for the model…";
  const started = performance.now();
  let pieces = 0;
  try {
    const text = await streamGenerate(body, (piece) => {
      pieces += 1;
      target.textContent += piece;
      box.scrollTop = box.scrollHeight;
      stats.textContent = `${pieces} pieces · ${((performance.now() - started) / 1000).toFixed(1)} s`;
    }, signal);
    target.textContent = text;
    if (chat) state.conversations[side].push({ role: "user", content: prompt }, { role: "assistant", content: text });
    stats.textContent = `Done: ${text.length} characters in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (error) {
    stats.textContent = error.name === "AbortError" ? "Stopped." : "Failed.";
    throw error;
  } finally {
    box.setAttribute("aria-busy", "false");
    box.classList.remove("streaming");
  }
}

// ------------------------------------------------------------------ upload and train
async function uploadFile() {
  const file = $("upload-file").files[0];
  const status = $("upload-status");
  if (!file) {
    status.textContent = "Choose a file first.";
    return;
  }
  if (state.maxUploadBytes && file.size > state.maxUploadBytes) {
    status.textContent = `${file.name} is ${formatBytes(file.size)}, over the ${formatBytes(state.maxUploadBytes)} cap; copy it into the data root instead.`;
    return;
  }
  const name = file.name.replace(/[^A-Za-z0-9_.-]/g, "_").replace(/^[^A-Za-z0-9]+/, "");
  status.textContent = `Uploading ${name}…`;
  try {
    let response = await api(`v1/files/${encodeURIComponent(name)}`, { method: "PUT", raw: file });
    if (response.status === 409 && confirm(`uploads/${name} exists already. Replace it?`)) {
      response = await api(`v1/files/${encodeURIComponent(name)}?overwrite=true`, { method: "PUT", raw: file });
    }
    const data = await response.json();
    if (!response.ok) throw new ApiError(data.error.message, response.status);
    status.textContent = `Uploaded ${data.path} (${formatBytes(data.size_bytes)}).`;
    $("train-data-file").value = data.path;
    if (!$("evaluate-file").value) $("evaluate-file").value = data.path;
    await refreshFiles();
  } catch (error) {
    status.textContent = `Upload failed: ${error.message}`;
  }
}

function defaultAdapterName() {
  const now = new Date();
  const pad = (n) => String(n).padStart(2, "0");
  return `adapter-${now.getFullYear()}${pad(now.getMonth() + 1)}${pad(now.getDate())}-${pad(now.getHours())}${pad(now.getMinutes())}`;
}

function updateOutputDir() {
  $("train-output-dir").textContent = `runs/${$("train-adapter-name").value || "…"}`;
}

async function startTraining(event) {
  event.preventDefault();
  showError("train-error", null);
  const name = $("train-adapter-name").value.trim();
  const trainingParams = {};
  for (const id of ["train-epochs", "train-learning-rate", "train-cutoff", "train-micro-batch", "train-batch", "train-lora-r", "train-lora-alpha"]) {
    const input = $(id);
    if (input.value !== "") trainingParams[input.name] = Number(input.value);
  }
  const body = {
    data_file: $("train-data-file").value.trim(),
    output_dir: `runs/${name}`,
    adapter_name: name,
    training_params: trainingParams,
  };
  if ($("train-max-steps").value !== "") body.training_args_kwargs = { max_steps: Number($("train-max-steps").value) };
  $("start-training").disabled = true;
  // The job watched before (a finished or cancelled one) must not read as this run's state.
  clearTimeout(state.jobTimer);
  state.watchedJob = null;
  clearJobPanel(`${name} · starting`, "Starting…");
  try {
    const job = await apiJson("v1/jobs/train", { method: "POST", json: body });
    watchJob(job.job_id);
    await refreshJobs();
  } catch (error) {
    showError("train-error", error);
    clearJobPanel(name, "Not started: see the error above.");
  } finally {
    $("start-training").disabled = false;
  }
}

function watchJob(jobId) {
  clearTimeout(state.jobTimer);
  state.watchedJob = jobId;
  // Nothing of the job watched before may linger until the first answer about this one.
  clearJobPanel(`job ${jobId}`, "Asking the server…");
  pollJob(jobId);
}

function clearJobPanel(title, stateText) {
  $("job-title").textContent = title;
  $("job-state").textContent = stateText;
  $("job-state").dataset.state = "";
  $("job-progress").value = 0;
  for (const id of ["job-step", "job-eta", "job-tps", "job-loss"]) $(id).textContent = "–";
  $("job-result").textContent = "";
  $("try-adapter").hidden = true;
  $("cancel-job").disabled = true;
  drawLossChart($("loss-chart"), []);
}

async function pollJob(jobId) {
  if (state.watchedJob !== jobId) return;
  let job;
  let loss;
  try {
    [job, loss] = await Promise.all([apiJson(`v1/jobs/${jobId}`), apiJson(`v1/jobs/${jobId}/loss`)]);
  } catch (error) {
    $("job-state").textContent = `Cannot read job ${jobId}: ${error.message}`;
    return;
  }
  if (state.watchedJob !== jobId) return;
  showJob(job, loss);
  if (ACTIVE_JOB_STATES.includes(job.state)) {
    state.jobTimer = setTimeout(() => pollJob(jobId), JOB_POLL_MS);
  } else {
    await finishJob(job);
  }
}

function showJob(job, loss) {
  const p = job.progress || {};
  const name = job.params.adapter_name;
  $("job-title").textContent = `${name} · job ${job.job_id}`;
  const phase = p.state && p.state !== job.state ? ` (${p.state})` : "";
  $("job-state").textContent = `${capitalize(job.state)}${phase} · ${formatDuration(job.elapsed_s)} elapsed`;
  $("job-state").dataset.state = job.state;
  const total = p.total_steps || 0;
  const step = p.step || 0;
  const progress = $("job-progress");
  progress.max = total || 1;
  progress.value = job.state === "done" ? progress.max : step;
  $("job-step").textContent = total ? `${step} / ${total}` : "–";
  $("job-eta").textContent = ACTIVE_JOB_STATES.includes(job.state) ? formatDuration(p.eta_s) : "–";
  $("job-tps").textContent = p.tokens_per_s != null ? Math.round(p.tokens_per_s).toLocaleString() : "–";
  $("job-loss").textContent = formatNumber(p.loss);
  $("cancel-job").disabled = !["queued", "running"].includes(job.state);
  drawLossChart($("loss-chart"), loss.points, loss.eval_points);
}

async function finishJob(job) {
  const result = job.result || {};
  const messages = {
    done: `Adapter ${result.adapter || job.params.adapter_name} is trained and loaded` +
      (result.train_loss != null ? ` (final loss ${formatNumber(result.train_loss)})` : "") + ".",
    cancelled: "Cancelled. Start again with the same name to resume from the last checkpoint.",
    failed: `Failed: ${job.error}`,
  };
  $("job-result").textContent = messages[job.state] || job.state;
  const general = result.general;
  if (job.state === "done" && general && general.retained != null) {
    $("job-result").textContent += ` General knowledge kept: ${Math.round(general.retained * 100)}% ` +
      `(${general.adapter_right} of the ${general.base_right} general questions the base model answers right).`;
  }
  if (result.warnings && result.warnings.length) $("job-result").textContent += ` Note: ${result.warnings.join(" ")}`;
  $("try-adapter").hidden = job.state !== "done";
  $("try-adapter").dataset.adapter = result.adapter || job.params.adapter_name;
  await Promise.all([refreshAdapters(), refreshJobs(), refreshFiles()]);
}

async function cancelJob() {
  if (!state.watchedJob) return;
  $("cancel-job").disabled = true;
  try {
    await apiJson(`v1/jobs/${state.watchedJob}/cancel`, { method: "POST" });
  } catch (error) {
    $("job-result").textContent = `Cancel failed: ${error.message}`;
  }
}

async function refreshJobs() {
  let jobs;
  try {
    jobs = (await apiJson("v1/jobs")).filter((j) => j.kind === "train").reverse();
  } catch {
    return [];
  }
  const rows = jobs.map((job) => element("tr", {},
    element("th", { scope: "row" }, job.params.adapter_name || job.job_id),
    element("td", {}, job.state),
    element("td", {}, job.progress.total_steps ? `${job.progress.step || 0} / ${job.progress.total_steps}` : "–"),
    element("td", {}, formatTime(job.started || job.created)),
    element("td", { className: "row-actions" },
      element("button", { type: "button", onclick: () => watchJob(job.job_id), "aria-label": `Watch job ${job.job_id}` }, "Watch")),
  ));
  if (!rows.length) rows.push(element("tr", {}, element("td", { colspan: "5", className: "empty" }, "No training jobs yet.")));
  $("jobs-table").tBodies[0].replaceChildren(...rows);
  return jobs;
}

function capitalize(text) {
  return text ? text[0].toUpperCase() + text.slice(1) : "";
}

// ------------------------------------------------------------------ loss chart (hand-drawn SVG)
const SVG_NS = "http://www.w3.org/2000/svg"; // an XML namespace name, not a download

function svg(tag, attributes = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text != null) node.textContent = text;
  return node;
}

function drawLossChart(chart, points, evalPoints = []) {
  const width = 600;
  const height = 220;
  const pad = { left: 52, right: 16, top: 14, bottom: 30 };
  chart.replaceChildren();
  chart.dataset.points = String(points.length);
  if (!points.length) {
    chart.append(svg("text", { x: width / 2, y: height / 2, class: "chart-empty", "text-anchor": "middle" }, "The loss curve appears here once training starts."));
    return;
  }
  const all = [...points, ...evalPoints];
  const steps = all.map((p) => p.step);
  const losses = all.map((p) => p.loss);
  const xMin = Math.min(...steps);
  const xMax = Math.max(...steps, xMin + 1);
  let yMin = Math.min(...losses);
  let yMax = Math.max(...losses);
  const margin = (yMax - yMin) * 0.08 || Math.abs(yMax) * 0.1 || 1;
  yMin -= margin;
  yMax += margin;
  const x = (step) => pad.left + ((step - xMin) / (xMax - xMin)) * (width - pad.left - pad.right);
  const y = (loss) => pad.top + (1 - (loss - yMin) / (yMax - yMin)) * (height - pad.top - pad.bottom);

  for (let i = 0; i <= 4; i += 1) {
    const value = yMin + ((yMax - yMin) * i) / 4;
    chart.append(svg("line", { x1: pad.left, x2: width - pad.right, y1: y(value), y2: y(value), class: "chart-grid" }));
    chart.append(svg("text", { x: pad.left - 6, y: y(value) + 4, "text-anchor": "end", class: "chart-label" }, value.toFixed(2)));
  }
  for (const step of [xMin, Math.round((xMin + xMax) / 2), xMax]) {
    chart.append(svg("text", { x: x(step), y: height - 10, "text-anchor": "middle", class: "chart-label" }, String(step)));
  }
  chart.append(svg("text", { x: pad.left - 6, y: height - 10, "text-anchor": "end", class: "chart-label" }, "step"));
  const line = points.map((p) => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ");
  chart.append(svg("polyline", { points: line, class: "chart-line" }));
  const last = points[points.length - 1];
  chart.append(svg("circle", { cx: x(last.step), cy: y(last.loss), r: 3.5, class: "chart-dot" }));
  for (const p of evalPoints) {
    chart.append(svg("circle", { cx: x(p.step), cy: y(p.loss), r: 4, class: "chart-eval" }, null));
  }
}

// ------------------------------------------------------------------ adapters: load and evaluate
async function loadAdapter(event) {
  event.preventDefault();
  const status = $("load-status");
  const body = { path: $("load-path").value.trim(), make_default: $("load-default").checked };
  if ($("load-name").value.trim()) body.name = $("load-name").value.trim();
  status.textContent = "Loading…";
  try {
    const adapter = await apiJson("v1/adapters", { method: "POST", json: body });
    status.textContent = `Loaded ${adapter.name} in ${adapter.seconds} s.`;
    $("load-name").value = "";
  } catch (error) {
    status.textContent = `Load failed: ${error.message}`;
  }
  await refreshAdapters();
}

async function evaluate(event) {
  event.preventDefault();
  const status = $("evaluate-status");
  const body = { data_file: $("evaluate-file").value.trim(), adapter: $("evaluate-adapter").value };
  status.textContent = `Evaluating ${body.adapter} on ${body.data_file}…`;
  $("evaluate").disabled = true;
  try {
    const result = await apiJson("v1/evaluate", { method: "POST", json: body });
    $("evaluate-loss").textContent = formatNumber(result.loss);
    $("evaluate-perplexity").textContent = formatNumber(result.perplexity);
    $("evaluate-examples").textContent = result.examples != null ? String(result.examples) : "–";
    $("evaluate-result").hidden = false;
    status.textContent = `${body.adapter} on ${body.data_file}.`;
  } catch (error) {
    status.textContent = `Evaluation failed: ${error.message}`;
  } finally {
    $("evaluate").disabled = false;
  }
}

// ------------------------------------------------------------------ start
function setUp() {
  setUpTabs();
  $("forget-token").addEventListener("click", forgetToken);
  $("token-dialog").addEventListener("cancel", (event) => event.preventDefault()); // the page needs it
  $("token-form").addEventListener("submit", (event) => {
    if (!$("token-input").value.trim()) event.preventDefault();
  });

  $("generate-form").addEventListener("submit", generate);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("generate-form").requestSubmit();
  });
  $("stop").addEventListener("click", () => state.abort && state.abort.abort());
  $("new-conversation").addEventListener("click", newConversation);
  $("compare").addEventListener("change", updateCompareControls);
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", updateModeControls);
  $("do-sample").addEventListener("change", () => {
    for (const id of ["temperature", "top-p", "top-k", "seed"]) $(id).disabled = !$("do-sample").checked;
  });

  $("train-adapter-name").value = defaultAdapterName();
  updateOutputDir();
  $("train-adapter-name").addEventListener("input", updateOutputDir);
  $("train-form").addEventListener("submit", startTraining);
  $("upload").addEventListener("click", uploadFile);
  $("cancel-job").addEventListener("click", cancelJob);
  $("try-adapter").addEventListener("click", () => useAdapter($("try-adapter").dataset.adapter));
  for (const button of document.querySelectorAll(".refresh-files")) button.addEventListener("click", refreshFiles);

  $("load-form").addEventListener("submit", loadAdapter);
  $("evaluate-form").addEventListener("submit", evaluate);

  drawLossChart($("loss-chart"), []);
  start();
}

async function start() {
  await loadModel(); // asks for the token first when the server needs one
  await Promise.all([loadSettings().catch(() => null), refreshAdapters(), refreshFiles()]);
  const jobs = await refreshJobs();
  const running = jobs.find((j) => ACTIVE_JOB_STATES.includes(j.state));
  if (running) watchJob(running.job_id);
  document.body.dataset.ready = "true";
}

setUp();
