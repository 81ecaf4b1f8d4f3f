// Laneway's page: submit a chat job and watch its events, using only the public
// HTTP API (POST /v1/jobs, GET /v1/jobs/{id}/events as Server-Sent Events).
// Plain script, no build step. URL parameters prefill the form: ?route=&prompt=&stream=0
"use strict";

const FINAL = new Set(["SUCCEEDED", "NOT_ENQUEUED", "CANCELLED", "EXPIRED", "DEAD_LETTERED", "SUPERSEDED"]);
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(window.location.search);
let source = null;

function apiKey() {
  return $("api-key").value.trim();
}

function headers(extra) {
  const h = Object.assign({ Accept: "application/json" }, extra || {});
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function stateName(state) {
  return String(state || "JOB_STATE_UNSPECIFIED").replace(/^JOB_STATE_/, "");
}

function showError(title, detail, reason) {
  $("error-title").textContent = title || "Error";
  $("error-detail").textContent = detail || "";
  $("error-reason").textContent = reason || "-";
  $("error").hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error-title").textContent = "";
  $("error-detail").textContent = "";
  $("error-reason").textContent = "";
}

// An HTTP error answer: application/problem+json when the gateway sent one.
async function showProblem(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch (e) {
    problem = { title: response.status + " " + response.statusText };
  }
  let detail = problem.detail || "";
  if (problem.field) detail += (detail ? " " : "") + "(field: " + problem.field + ")";
  showError(problem.title || "HTTP " + response.status, detail, problem.reason);
}

async function loadRoutes() {
  const select = $("route");
  const wanted = params.get("route");
  let routes = [];
  try {
    const response = await fetch("/v1/server-info", { headers: headers() });
    if (response.ok) {
      routes = (await response.json()).routes || [];
    } else {
      await showProblem(response);
    }
  } catch (e) {
    showError("Gateway unreachable", String(e), "");
  }
  // A route named in the URL is offered even when the server does not list it:
  // submitting it shows the server's own answer.
  if (wanted && !routes.includes(wanted)) routes = [wanted].concat(routes);
  const previous = select.value;
  select.replaceChildren(...routes.map((name) => new Option(name, name)));
  select.value = wanted || previous || routes[0] || "";
  select.dataset.loaded = "true";
}

function resetJob() {
  if (source) source.close();
  source = null;
  clearError();
  $("job-id").textContent = "-";
  $("final-state").textContent = "-";
  delete $("final-state").dataset.final;
  $("states").replaceChildren();
  $("output").replaceChildren();
  $("output").classList.remove("reset");
  $("final-text").textContent = "";
}

function addStateLine(ev, state) {
  const li = document.createElement("li");
  const parts = [state, "attempt " + (ev.attempt || 0)];
  if (ev.provider) parts.push("provider " + ev.provider + (ev.model ? " (" + ev.model + ")" : ""));
  if (ev.error) parts.push((ev.error.code || "") + ": " + (ev.error.message || ""));
  li.textContent = parts.join(" · ");
  li.dataset.state = state;
  li.dataset.attempt = String(ev.attempt || 0);
  li.dataset.provider = ev.provider || "";
  if (FINAL.has(state)) li.classList.add("final");
  $("states").append(li);
}

function onEvent(ev) {
  const state = stateName(ev.state);
  if (ev.delta) {
    const output = $("output");
    if (output.classList.contains("reset")) {
      output.replaceChildren();
      output.classList.remove("reset");
    }
    const span = document.createElement("span");
    span.className = "delta";
    span.dataset.seq = String(ev.seq || "");
    span.textContent = ev.delta.text || "";
    output.append(span);
    return;
  }
  addStateLine(ev, state);
  $("final-state").textContent = state;
  if (ev.reset) $("output").classList.add("reset"); // a failed attempt's text; the retry's replaces it
  if (ev.result && ev.result.chat) $("final-text").textContent = ev.result.chat.text || "";
  if (FINAL.has(state)) {
    $("final-state").dataset.final = "true";
    if (ev.error) showError("Job " + state, ev.error.message, ev.error.code);
    if (source) source.close();
    source = null;
  }
}

function watch(jobId) {
  let url = "/v1/jobs/" + encodeURIComponent(jobId) + "/events";
  // EventSource cannot send headers: the key goes in the query instead.
  if (apiKey()) url += "?access_token=" + encodeURIComponent(apiKey());
  let lastSeq = 0;
  const es = new EventSource(url);
  source = es;
  // Each event is "event: job" with a JobEvent as data; the browser resumes a broken
  // stream by itself, sending the last id (the seq) as Last-Event-ID.
  es.addEventListener("job", (message) => {
    const ev = JSON.parse(message.data);
    const seq = Number(ev.seq || 0);
    if (seq && seq <= lastSeq) return; // already shown before a reconnect
    if (seq) lastSeq = seq;
    onEvent(ev);
  });
  es.addEventListener("error", async (message) => {
    if (message.data) {
      // "event: error": the gateway's problem document, sent inside the stream.
      const problem = JSON.parse(message.data);
      showError(problem.title || "Stream error", problem.detail, problem.reason);
      es.close();
      source = null;
      return;
    }
    if (es.readyState !== EventSource.CLOSED || source !== es) return; // the browser reconnects
    source = null;
    const response = await fetch("/v1/jobs/" + encodeURIComponent(jobId), { headers: headers() });
    if (!response.ok) await showProblem(response);
    else showError("Event stream closed", "The job is " + stateName((await response.json()).state), "");
  });
}

async function submit(event) {
  event.preventDefault();
  resetJob();
  const spec = {
    route: $("route").value,
    chat: {
      messages: [{ role: "CHAT_ROLE_USER", content: $("prompt").value }],
      stream: $("stream").checked,
    },
  };
  $("submit").disabled = true;
  try {
    const response = await fetch("/v1/jobs", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(spec),
    });
    if (!response.ok) {
      await showProblem(response);
      $("final-state").textContent = "NOT SUBMITTED";
      return;
    }
    const jobId = (await response.json()).jobId;
    $("job-id").textContent = jobId;
    watch(jobId);
  } catch (e) {
    showError("Gateway unreachable", String(e), "");
  } finally {
    $("submit").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  if (params.get("stream") === "0") $("stream").checked = false;
  $("job-form").addEventListener("submit", submit);
  $("api-key").addEventListener("change", loadRoutes);
  loadRoutes();
});
