/* DeML dashboard. Plain JavaScript: each page reads /api/ (and /v2 for "try it") and keeps live with one
   EventSource. Charts are uPlot (vendor/uplot). */
"use strict";

const main = document.getElementById("main");
const page = document.body.dataset.page;

// -- small helpers ----------------------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const text = await response.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (e) { body = { error: text }; }
  if (!response.ok) {
    const err = new Error((body && body.error) || response.statusText);
    err.status = response.status;
    err.body = body || {};
    throw err;
  }
  return body;
}

function fmtNum(value, digits = 4) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toFixed(digits);
}
function fmtPct(value) {
  if (value === null || value === undefined) return "–";
  return (100 * value).toFixed(1) + "%";
}
function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}
function fmtAge(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.round(s / 60) + " min";
  if (s < 86400) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function fmtTime(iso) { return new Date(iso).toLocaleTimeString(); }
function fmtSeconds(s) { return s === null || s === undefined ? "–" : s < 10 ? s.toFixed(2) + " s" : s.toFixed(1) + " s"; }
function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
function badge(text) { return el("span", { class: "badge " + text }, text); }
const TERMINAL = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);

// Calls fn at most once per `ms`, always once more after the last request.
function throttle(fn, ms) {
  let timer = null, again = false;
  return function run() {
    if (timer) { again = true; return; }
    fn();
    timer = setTimeout(() => { timer = null; if (again) { again = false; run(); } }, ms);
  };
}

function showError(where, err) {
  where.replaceChildren(el("div", { class: "notice bad" }, err.message || String(err)));
}

// -- jobs page ------------------------------------------------------------------------------------------------

async function jobsPage() {
  const filter = el("select", { id: "state-filter" },
    ["", "PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"].map(s => el("option", { value: s }, s || "All states")));
  const params = new URLSearchParams(location.search);
  filter.value = (params.get("state") || "").toUpperCase();
  const tbody = el("tbody", { id: "jobs-body" });
  const table = el("table", { id: "jobs" },
    el("thead", {}, el("tr", {},
      el("th", {}, "Job"), el("th", {}, "State"), el("th", {}, "Rounds"), el("th", { class: "num" }, "Latest acc."),
      el("th", { class: "num" }, "Best acc."), el("th", {}, "Strategy"), el("th", {}, "Backend"),
      el("th", { class: "num" }, "Cost (GLM)"), el("th", { class: "num" }, "Age"))),
    tbody);
  const count = el("span", { class: "muted" });
  main.replaceChildren(
    el("div", { class: "toolbar" }, el("h1", {}, "Jobs"), count, el("span", { class: "grow" }),
      el("label", { for: "state-filter", class: "muted" }, "State"), el("div", { style: "width:170px" }, filter),
      el("a", { class: "button", href: "/submit" }, "New job")),
    el("div", { class: "card" }, table));

  let source = null;
  async function load() {
    const state = filter.value;
    const data = await api("/api/jobs" + (state ? "?state=" + state : ""));
    tbody.replaceChildren(...data.jobs.map(jobRow));
    if (!data.jobs.length) tbody.append(el("tr", {}, el("td", { colspan: 9, class: "muted" }, "No jobs" + (state ? " in state " + state : "") + ".")));
    count.textContent = data.jobs.length + (data.jobs.length === 1 ? " job" : " jobs");
    return data.last_event_seq;
  }
  const reload = throttle(() => load().catch(err => showError(tbody, err)), 700);
  filter.addEventListener("change", () => {
    const url = new URL(location.href);
    if (filter.value) url.searchParams.set("state", filter.value); else url.searchParams.delete("state");
    history.replaceState(null, "", url);
    reload();
  });
  const after = await load();
  source = new EventSource("/api/events?after=" + after);
  source.onmessage = ev => {
    const data = JSON.parse(ev.data);
    if (data.kind !== "PROGRESS" || data.progress === null) reload();
  };
  setInterval(() => document.querySelectorAll("[data-created]").forEach(td => { td.textContent = fmtAge(td.dataset.created); }), 5000);
}

function jobRow(job) {
  const pct = job.rounds_total ? (100 * job.rounds_committed / job.rounds_total) : 0;
  return el("tr", { "data-job-id": job.id, "data-state": job.state },
    el("td", {}, el("a", { href: "/jobs/" + job.id }, job.name), " ", el("span", { class: "muted mono" }, job.id)),
    el("td", {}, badge(job.state)),
    el("td", { class: "rounds" }, el("span", { class: "bar" }, el("span", { style: "width:" + pct + "%" })),
      job.rounds_committed + " / " + job.rounds_total),
    el("td", { class: "num" }, fmtPct(job.latest_accuracy)),
    el("td", { class: "num" }, fmtPct(job.best_accuracy)),
    el("td", {}, job.strategy),
    el("td", {}, job.backend),
    el("td", { class: "num" }, job.cost_glm === null ? "–" : fmtNum(job.cost_glm, 6)),
    el("td", { class: "num", "data-created": job.created_at }, fmtAge(job.created_at)));
}

// -- job page -------------------------------------------------------------------------------------------------

const CHARTS = [
  { id: "chart-accuracy", title: "Test accuracy", series: [["accuracy", "accuracy"]], baseline: "accuracy" },
  { id: "chart-loss", title: "Test loss", series: [["loss", "loss"]], baseline: "loss" },
  { id: "chart-train", title: "Train metrics", series: [["train_loss", "train loss"], ["train_accuracy", "train accuracy"]] },
  { id: "chart-wall", title: "Round wall time (s)", series: [["@wall", "seconds"]] },
  { id: "chart-bytes", title: "Bytes per worker", series: [["@bytes", "sent"], ["bytes_received_per_worker", "received"]] },
  { id: "chart-glm", title: "GLM per round", series: [["cost_glm", "GLM"]] },
];
const TASK_ROWS = 300;
const LOG_ROWS = 1000;
const COLORS = ["#2f6fdb", "#e07a1f", "#1a8a4a", "#8e44ad"];

function roundValue(round, key) {
  if (key === "@wall") return round.wall_seconds;
  if (key === "@bytes") return round.bytes_sent_per_worker;
  const v = round.metrics[key];
  return v === undefined ? null : v;
}

class RoundChart {
  constructor(spec, box) {
    this.spec = spec;
    this.box = box;
    this.plot = null;
    this.baseline = null;
  }
  update(rounds, job, total) {
    const spec = this.spec;
    const baseline = job ? job.baseline_metrics : null;
    // With the baseline's curve, test metrics are drawn against epochs-equivalent (round x local epochs): the
    // centralized point k has trained as many epochs as federated round k. Without one, a flat baseline line.
    const curve = spec.baseline && job && job.baseline_curve && job.baseline_curve.length ? job.baseline_curve : null;
    // A local_steps job's baseline points count steps, not epochs: they are drawn against the round instead.
    if (curve && job.spec.local_steps > 0) return this.draw(curvePlot(spec, rounds, curve, 1, "round"), total, rounds.length);
    if (curve) return this.draw(curvePlot(spec, rounds, curve, job.spec.local_epochs), total * job.spec.local_epochs, rounds.length);
    const xs = rounds.map(r => r.round);
    const columns = spec.series.map(([key]) => rounds.map(r => roundValue(r, key)));
    const base = spec.baseline && baseline && baseline[spec.baseline] !== undefined ? baseline[spec.baseline] : null;
    const extra = base === null ? [] : [{ label: "centralized baseline", column: xs.map(() => base), flat: true }];
    return this.draw({ axis: "round", step: 1, xs, columns, extra }, total, xs.length);
  }
  draw(plan, total, count) {
    const spec = this.spec;
    const { xs, columns, extra } = plan;
    const present = columns.map(col => col.some(v => v !== null));
    this.box.dataset.points = String(present.some(Boolean) ? count : 0);
    this.box.dataset.axis = plan.axis;
    this.box.dataset.baselinePoints = String(extra.length && !extra[0].flat ? extra[0].column.filter(v => v !== null).length : 0);
    if (!present.some(Boolean)) {
      const why = spec.id === "chart-glm" ? "This backend charges nothing." : "No rounds committed yet.";
      if (!this.box.querySelector(".empty")) this.box.replaceChildren(el("h2", {}, spec.title), el("div", { class: "empty" }, why));
      return;
    }
    const series = [{}];
    const data = [xs];
    spec.series.forEach(([, label], i) => {
      if (!present[i]) return;
      series.push({ label, stroke: COLORS[i], width: 2, points: { size: 6 } });
      data.push(columns[i]);
    });
    extra.forEach(line => {
      series.push({ label: line.label, stroke: "#888", dash: [6, 4], width: 1.5, points: line.flat ? { show: false } : { size: 5 } });
      data.push(line.column);
    });
    const shape = plan.axis + "|" + series.map(s => s.label).join("|");
    if (this.plot && this.shape === shape) {
      this.plot.setData(data);
      return;
    }
    if (this.plot) this.plot.destroy();
    this.box.replaceChildren(el("h2", {}, spec.title));
    const width = Math.max(320, this.box.clientWidth - 24);
    this.plot = new uPlot({
      width, height: 210,
      // The x axis spans every planned round, so the curve visibly grows as rounds commit.
      scales: { x: { time: false, range: (u, lo, hi) => [plan.step, Math.max(2 * plan.step, total || 0, hi || 0)] } },
      axes: [{ label: plan.axis === "epochs" ? "epochs (round × local epochs)" : "round", size: 36,
        incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000] }, { size: 56 }],
      series,
      legend: { live: false },
    }, data, this.box);
    this.shape = shape;
  }
}

// The federated metric and the centralized baseline's curve on one epochs-equivalent axis, aligned by round.
function curvePlot(spec, rounds, curve, localEpochs, axis = "epochs") {
  const byRound = new Map(rounds.map(r => [r.round, r]));
  const points = new Map(curve.map(p => [p.round, p]));
  const order = [...new Set([...byRound.keys(), ...points.keys()])].sort((a, b) => a - b);
  const epochs = r => axis === "round" ? r : points.has(r) ? points.get(r).epochs : r * localEpochs;
  const columns = spec.series.map(([key]) => order.map(r => byRound.has(r) ? roundValue(byRound.get(r), key) : null));
  const central = order.map(r => {
    const v = points.has(r) ? points.get(r).metrics[spec.baseline] : undefined;
    return v === undefined || v === null ? null : v;
  });
  return { axis, step: localEpochs, xs: order.map(epochs), columns, extra: [{ label: "centralized baseline", column: central, flat: false }] };
}

async function jobPage() {
  const jobId = document.body.dataset.jobId;
  const head = el("div", { class: "card", id: "job-head" });
  const errorBox = el("div", { id: "job-error" });
  const charts = el("div", { class: "charts" });
  const chartObjs = CHARTS.map(spec => {
    const box = el("div", { class: "chart", id: spec.id, "data-points": "0" }, el("h2", {}, spec.title));
    charts.append(box);
    return new RoundChart(spec, box);
  });
  const taskBody = el("tbody", { id: "tasks-body" });
  const logBody = el("tbody", { id: "log-body" });
  main.replaceChildren(head, errorBox, charts,
    el("div", { class: "card" }, el("h2", {}, "Worker tasks"),
      el("div", { class: "scroll" }, el("table", { id: "tasks" },
        el("thead", {}, el("tr", {}, el("th", { class: "num" }, "Round"), el("th", {}, "Task"), el("th", { class: "num" }, "Partition"),
          el("th", {}, "Worker / provider"), el("th", { class: "num" }, "Attempt"), el("th", { class: "num" }, "Duration"),
          el("th", {}, "Outcome"), el("th", {}, "Reason"))),
        taskBody))),
    el("div", { class: "card" }, el("h2", {}, "Event log"),
      el("div", { class: "scroll", id: "log-scroll" }, el("table", { class: "log", id: "log" }, logBody))));

  const rounds = new Map();
  let job = null;

  function drawCharts() {
    const list = [...rounds.values()].sort((a, b) => a.round - b.round);
    chartObjs.forEach(c => c.update(list, job, job ? job.rounds_total : list.length));
  }
  // A round's point is drawn as its event arrives; rounds faster than 4 a second share a frame.
  const redraw = throttle(drawCharts, 250);

  // Rounds come from the event stream only (its replay has every committed one), so each commit adds one point.
  async function loadJob() {
    job = await api("/api/jobs/" + jobId + "?rounds=0");
    renderHead();
    redraw();
  }
  function renderHead() {
    const cancel = el("button", { class: "danger", id: "cancel", onclick: onCancel }, "Cancel job");
    if (TERMINAL.has(job.state)) cancel.disabled = true;
    const model = job.model ? el("a", { href: "/models#" + job.model.name + ":" + job.model.version }, job.model.name + ":" + job.model.version) : "–";
    const acc = job.latest_accuracy === null ? "–" : fmtPct(job.latest_accuracy);
    head.replaceChildren(el("div", { class: "job-head" },
      el("div", { class: "grow" },
        el("h1", {}, job.name, " ", el("span", { class: "muted mono" }, job.id), " ", el("span", { id: "job-state" }, badge(job.state))),
        el("div", { class: "meta" },
          el("span", {}, "rounds ", el("b", { id: "job-rounds" }, job.rounds_committed + " / " + job.rounds_total)),
          el("span", {}, "test accuracy ", el("b", {}, acc)),
          el("span", {}, "best ", el("b", {}, fmtPct(job.best_accuracy))),
          job.baseline_metrics && job.baseline_metrics.accuracy !== undefined ? el("span", {}, "baseline ", el("b", {}, fmtPct(job.baseline_metrics.accuracy))) : null,
          job.baseline_metrics && job.baseline_metrics.accuracy !== undefined ? el("span", { title: "the first round within 1 point of the centralized baseline's final accuracy" },
            "rounds to accuracy ", el("b", { id: "rounds-to-accuracy" }, job.rounds_to_accuracy === null || job.rounds_to_accuracy === undefined ? "not reached" : String(job.rounds_to_accuracy))) : null,
          el("span", {}, "strategy ", el("b", {}, job.strategy)),
          el("span", {}, "workers ", el("b", {}, job.spec.workers)),
          el("span", {}, "backend ", el("b", {}, job.backend)),
          job.cost_glm !== null ? el("span", {}, "cost ", el("b", {}, fmtNum(job.cost_glm, 6) + " GLM")) : null,
          el("span", {}, "started ", el("b", {}, fmtAge(job.created_at) + " ago")),
          el("span", {}, "model ", el("b", {}, model)))),
      cancel));
    if (job.error && job.state !== "CANCELLED") {
      const lines = job.error.split("\n");
      const tail = lines.length > 40 ? ["…", ...lines.slice(-40)] : lines;
      const pre = el("pre", { class: "error" }, tail.join("\n"));
      errorBox.replaceChildren(el("div", { class: "card" }, el("h2", {}, "Error"), pre));
      pre.scrollTop = pre.scrollHeight;  // the traceback's last lines are where the user's code failed
    } else if (job.error) {
      errorBox.replaceChildren(el("div", { class: "card muted" }, job.error));
    } else {
      errorBox.replaceChildren();
    }
  }
  async function onCancel(ev) {
    ev.target.disabled = true;
    try {
      job = await api("/api/jobs/" + jobId + "/cancel", { method: "POST" });
      renderHead();
    } catch (err) {
      ev.target.disabled = false;
      errorBox.replaceChildren(el("div", { class: "notice bad" }, err.message));
    }
  }
  async function loadTasks() {
    const data = await api("/api/jobs/" + jobId + "/tasks");
    // A long job has thousands of attempts: the newest few hundred are what a person reads.
    const shown = data.tasks.slice(-TASK_ROWS);
    taskBody.replaceChildren(...shown.map(t => el("tr", {},
      el("td", { class: "num" }, t.round || "–"), el("td", {}, t.action), el("td", { class: "num" }, t.action === "train" ? t.partition : "–"),
      el("td", { class: "mono" }, t.worker || "–"), el("td", { class: "num" }, t.attempt), el("td", { class: "num" }, fmtSeconds(t.seconds)),
      el("td", {}, badge(t.outcome)), el("td", { class: "muted" }, t.error ? t.error.split("\n").slice(-1)[0].slice(0, 200) : ""))));
    if (!data.tasks.length) taskBody.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No task has finished yet.")));
    if (data.tasks.length > shown.length) {
      taskBody.prepend(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "The last " + shown.length + " of " + data.tasks.length + " attempts (all of them: /api/jobs/" + jobId + "/tasks).")));
    }
  }
  const refreshJob = throttle(() => loadJob().catch(() => {}), 1000);
  const refreshTasks = throttle(() => loadTasks().catch(() => {}), 2000);

  function logEvent(data) {
    let text = data.message;
    if (data.kind === "ROUND_COMMITTED" && data.summary) {
      const m = data.summary.metrics;
      text = "round " + data.round + " committed" + (m.accuracy !== undefined ? ": accuracy " + fmtPct(m.accuracy) : "") +
        (m.loss !== undefined ? ", loss " + fmtNum(m.loss) : "") + " in " + fmtSeconds(data.summary.wall_seconds);
    } else if (data.kind === "STATE_CHANGED") {
      text = "job " + data.state.toLowerCase() + (data.message ? ": " + data.message.split("\n")[0] : "");
    } else if (data.progress) {
      text = "round " + data.progress[0] + ": " + data.progress[1] + " of " + data.progress[2] + " worker tasks done";
    }
    pendingLog.push(el("tr", { "data-seq": data.seq }, el("td", { class: "when" }, fmtTime(data.at)), el("td", {}, badge(data.kind === "ROUND_COMMITTED" ? "ROUND" : data.kind === "STATE_CHANGED" ? data.state : "PROGRESS")), el("td", {}, text)));
    flushLog();
  }
  // Log rows are added in batches (one layout per batch, not per event: a fast job sends dozens a second).
  const pendingLog = [];
  const flushLog = throttle(() => {
    const scroll = document.getElementById("log-scroll");
    const atBottom = scroll.scrollTop + scroll.clientHeight >= scroll.scrollHeight - 8;
    logBody.append(...pendingLog.splice(0));
    while (logBody.rows.length > LOG_ROWS) logBody.deleteRow(0);
    if (atBottom) scroll.scrollTop = scroll.scrollHeight;
  }, 250);

  await loadJob();
  loadTasks();
  const source = new EventSource("/api/jobs/" + jobId + "/events");
  source.onmessage = ev => {
    const data = JSON.parse(ev.data);
    logEvent(data);
    if (data.kind === "ROUND_COMMITTED" && data.summary && !rounds.has(data.summary.round)) {
      rounds.set(data.summary.round, data.summary);
      redraw();
    }
    // The header and the task table are read again at most every second or two, not per event: a fast job's
    // page must not cost its server (or its own machine's cores) much.
    if (data.kind !== "PROGRESS") refreshTasks();
    if (data.kind !== "PROGRESS" || data.message) refreshJob();
  };
}

// -- submit page ----------------------------------------------------------------------------------------------

const SPEC_FIELDS = [
  ["name", "text", "Model name", "registered as name:version"],
  ["rounds", "int", "Rounds", "federated rounds"],
  ["workers", "int", "Workers", "partitions trained per round"],
  ["local_epochs", "int", "Local epochs", "per worker per round"],
  ["local_steps", "int", "Local steps", "0 = train local epochs; > 0: minibatch steps per round instead"],
  ["batch_size", "int", "Batch size", ""],
  ["learning_rate", "float", "Learning rate", ""],
  ["strategy", "strategy", "Strategy", ""],
  ["strategy_options", "json", "Strategy options", 'JSON, e.g. {"proximal_mu": 0.01}'],
  ["partitioning", "partitioning", "Partitioning", ""],
  ["dirichlet_alpha", "float", "Dirichlet α", "non-IID skew (partitioning = dirichlet)"],
  ["seed", "int", "Seed", ""],
  ["min_fit_workers", "int", "Min. fit workers", "quorum; 0 = every sampled partition"],
  ["fraction_fit", "float", "Fraction fit", "share of partitions trained per round (1 = all)"],
  ["min_fit", "int", "Min. fit", "fewest partitions sampled per round"],
  ["round_deadline_seconds", "float", "Round deadline (s)", "0 = none; late tasks dropped if the quorum is met"],
  ["test_fraction", "float", "Test fraction", "held out when data has no test split"],
  ["task_timeout_seconds", "float", "Task timeout (s)", ""],
  ["budget_glm", "float", "Budget (GLM)", "0 = no cap of its own"],
  ["backend", "text", "Backend", "local or golem"],
  ["module", "text", "Module", "the task's Python module"],
  ["baseline", "bool", "Centralized baseline", "train one model on all data too"],
];

async function submitPage() {
  let form_info, examples;
  try {
    [form_info, examples] = await Promise.all([api("/api/spec"), api("/api/examples")]);
  } catch (err) { showError(main, err); return; }
  const inputs = {};
  const fieldBoxes = {};
  function fieldBox(name, label, hint, input) {
    const box = el("div", { class: "field", id: "field-" + name },
      el("label", { for: "spec-" + name }, label), input, hint ? el("div", { class: "hint" }, hint) : null,
      el("div", { class: "field-error", id: "error-" + name }));
    fieldBoxes[name] = box;
    return box;
  }
  const grid = el("div", { class: "form-grid" });
  for (const [name, kind, label, hint] of SPEC_FIELDS) {
    let input;
    if (kind === "strategy") {
      input = el("select", {}, Object.keys(form_info.strategies).map(s => el("option", { value: s }, s)));
    } else if (kind === "partitioning") {
      input = el("select", {}, form_info.partitionings.map(s => el("option", { value: s }, s)));
    } else if (kind === "bool") {
      input = el("input", { type: "checkbox", style: "width:auto" });
    } else if (kind === "int" || kind === "float") {
      input = el("input", { type: "text", inputmode: "decimal" });
    } else {
      input = el("input", { type: "text" });
    }
    input.id = "spec-" + name;
    input.name = name;
    inputs[name] = input;
    grid.append(fieldBox(name, label, hint, input));
  }
  function fill(spec) {
    for (const [name, kind] of SPEC_FIELDS) {
      if (!(name in spec)) continue;
      const value = spec[name];
      if (kind === "bool") inputs[name].checked = Boolean(value);
      else if (kind === "json") inputs[name].value = Object.keys(value || {}).length ? JSON.stringify(value) : "";
      else inputs[name].value = value;
    }
  }
  fill(form_info.defaults);

  const exampleSelect = el("select", { id: "example", name: "example" }, examples.examples.map(e => el("option", { value: e.name }, e.name)));
  const codeInput = el("input", { type: "file", id: "code", accept: ".zip" });
  const dataInput = el("input", { type: "file", id: "data", accept: ".npz" });
  const testInput = el("input", { type: "file", id: "test_data", accept: ".npz" });
  const useExample = el("input", { type: "radio", name: "source", id: "source-example", value: "example", checked: true, style: "width:auto" });
  const useUpload = el("input", { type: "radio", name: "source", id: "source-upload", value: "upload", style: "width:auto" });
  const exampleBox = fieldBox("example", "Bundled example", "from examples/ (its deml.toml fills the form)", exampleSelect);
  const codeBox = fieldBox("code", "Task zip", "a zip with task.py at its top level", codeInput);
  function sourceChanged() {
    exampleBox.style.display = useExample.checked ? "" : "none";
    codeBox.style.display = useUpload.checked ? "" : "none";
  }
  useExample.addEventListener("change", sourceChanged);
  useUpload.addEventListener("change", sourceChanged);
  function exampleChanged() {
    fill(form_info.defaults);
    const chosen = examples.examples.find(e => e.name === exampleSelect.value);
    if (chosen) fill(chosen.spec);
  }
  exampleSelect.addEventListener("change", exampleChanged);
  if (examples.examples.length) exampleChanged(); else { useUpload.checked = true; }
  sourceChanged();

  const notice = el("div", { id: "submit-error" });
  const button = el("button", { class: "primary", type: "submit", id: "submit" }, "Start job");
  const form = el("form", { id: "submit-form" },
    el("div", { class: "toolbar" }, el("h1", {}, "Submit a job")),
    notice,
    el("div", { class: "two" },
      el("div", { class: "card" }, el("h2", {}, "Task"),
        el("div", { class: "choice" },
          el("label", {}, useExample, " bundled example"), el("label", {}, useUpload, " upload")),
        exampleBox, codeBox,
        fieldBox("data", "Training data (optional)", ".npz with arrays x and y", dataInput),
        fieldBox("test_data", "Test data (optional)", ".npz with arrays x and y", testInput)),
      el("div", { class: "card" }, el("h2", {}, "Training spec"), grid,
        el("div", { style: "margin-top:16px" }, button))));
  main.replaceChildren(form);

  function clearErrors() {
    notice.replaceChildren();
    for (const box of Object.values(fieldBoxes)) {
      box.classList.remove("invalid");
      box.querySelector(".field-error").textContent = "";
    }
  }
  function fieldError(name, message) {
    const box = fieldBoxes[name];
    if (!box) { notice.replaceChildren(el("div", { class: "notice bad" }, message)); return; }
    box.classList.add("invalid");
    box.querySelector(".field-error").textContent = message;
    box.scrollIntoView({ block: "center" });
  }

  form.addEventListener("submit", async ev => {
    ev.preventDefault();
    clearErrors();
    const spec = {};
    for (const [name, kind] of SPEC_FIELDS) {
      const input = inputs[name];
      if (kind === "bool") { spec[name] = input.checked; continue; }
      const text = input.value.trim();
      if (text === "") continue;
      if (kind === "int" || kind === "float") {
        // Numbers go as numbers; what does not parse goes as typed, and the server names the field.
        spec[name] = /^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(text) ? Number(text) : text;
      } else if (kind === "json") {
        try { spec[name] = JSON.parse(text); } catch (e) { spec[name] = text; }
      } else {
        spec[name] = text;
      }
    }
    const body = new FormData();
    body.append("spec", JSON.stringify(spec));
    if (useExample.checked) body.append("example", exampleSelect.value);
    else if (codeInput.files.length) body.append("code", codeInput.files[0]);
    if (dataInput.files.length) body.append("data", dataInput.files[0]);
    if (testInput.files.length) body.append("test_data", testInput.files[0]);
    button.disabled = true;
    try {
      const job = await api("/api/jobs", { method: "POST", body });
      location.href = "/jobs/" + job.id;
    } catch (err) {
      button.disabled = false;
      if (err.body && err.body.field) fieldError(err.body.field, err.message);
      else notice.replaceChildren(el("div", { class: "notice bad" }, err.message));
    }
  });
}

// -- models page ----------------------------------------------------------------------------------------------

function signature(tensors) {
  return tensors.map(t => t.name + ": " + t.datatype + "[" + t.shape.map(d => d < 0 ? "N" : d).join(", ") + "]").join("; ");
}

function sampleTensor(spec) {
  const dims = spec.shape.map(d => (d < 0 ? 1 : d));
  const build = level => level === dims.length ? 0 : Array.from({ length: dims[level] }, () => build(level + 1));
  return build(0);
}

async function modelsPage() {
  let data;
  try { data = await api("/api/models"); } catch (err) { showError(main, err); return; }
  const tbody = el("tbody", { id: "models-body" });
  const tryBox = el("div", { class: "card", id: "try" });
  main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Models"), el("span", { class: "muted" }, plural(data.models.length, "version"))),
    el("div", { class: "card" }, el("table", { id: "models" },
      el("thead", {}, el("tr", {}, el("th", {}, "Model"), el("th", {}, "Inputs"), el("th", {}, "Outputs"), el("th", { class: "num" }, "Size"),
        el("th", { class: "num" }, "Export check max |ORT − torch|"), el("th", {}, "From job"), el("th", {}, "Created"), el("th", {}, ""))),
      tbody)),
    tryBox);
  if (!data.models.length) {
    tbody.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "No model is registered yet; a job that succeeds registers one.")));
    tryBox.remove();
    return;
  }
  for (const m of data.models) {
    const key = m.name + ":" + m.version;
    tbody.append(el("tr", { "data-model": key },
      el("td", {}, el("b", {}, m.name), ":" + m.version),
      el("td", { class: "mono" }, signature(m.inputs)),
      el("td", { class: "mono" }, signature(m.outputs)),
      el("td", { class: "num" }, fmtBytes(m.size_bytes)),
      el("td", { class: "num" }, m.export_max_abs_diff === null ? "–" : Number(m.export_max_abs_diff).toExponential(2)),
      el("td", {}, m.job_id ? el("a", { href: "/jobs/" + m.job_id, class: "mono" }, m.job_id) : "uploaded"),
      el("td", {}, fmtAge(m.created_at) + " ago"),
      el("td", {}, el("a", { href: "/api/models/" + m.name + "/versions/" + m.version + "/download" }, "download"),
        " · ", el("a", { href: "#" + key, onclick: () => choose(key) }, "try it"))));
  }
  const select = el("select", { id: "try-model" }, data.models.map(m => el("option", { value: m.name + ":" + m.version }, m.name + ":" + m.version)));
  const input = el("textarea", { id: "try-input", rows: 12 });
  const output = el("pre", { id: "try-output" }, "");
  const argmax = el("div", { class: "argmax", id: "try-argmax" });
  const run = el("button", { class: "primary", id: "try-run" }, "Infer");
  tryBox.append(el("h2", {}, "Try it"),
    el("p", { class: "muted" }, "Sends the tensor below (rows of the model's first input, as JSON) to ",
      el("span", { class: "mono", id: "try-url" }), " on the Open Inference Protocol's REST face."),
    el("div", { class: "toolbar" }, el("div", { style: "width:220px" }, select), run),
    el("div", { class: "try" }, el("div", {}, input), el("div", {}, output, argmax)));
  function model() {
    const [name, version] = select.value.split(":");
    return data.models.find(m => m.name === name && String(m.version) === version);
  }
  function choose(key) {
    if (key && [...select.options].some(o => o.value === key)) select.value = key;
    const m = model();
    input.value = JSON.stringify(sampleTensor(m.inputs[0]));
    document.getElementById("try-url").textContent = "POST /v2/models/" + m.name + "/versions/" + m.version + "/infer";
    output.textContent = "";
    argmax.textContent = "";
  }
  select.addEventListener("change", () => choose());
  run.addEventListener("click", async () => {
    const m = model();
    output.textContent = "…";
    argmax.textContent = "";
    let rows;
    try {
      rows = JSON.parse(input.value);
    } catch (err) {
      output.textContent = "The input is not valid JSON: " + err.message;
      return;
    }
    if (!Array.isArray(rows[0])) rows = [rows];
    const shape = [rows.length];
    for (let level = rows[0]; Array.isArray(level); level = level[0]) shape.push(level.length);
    const spec = m.inputs[0];
    const request = { inputs: [{ name: spec.name, shape, datatype: spec.datatype, data: rows.flat(Infinity) }] };
    try {
      const answer = await api("/v2/models/" + m.name + "/versions/" + m.version + "/infer", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
      });
      const out = answer.outputs[0];
      const width = out.shape.length === 2 ? out.shape[1] : out.data.length;
      const lines = [out.name + ": " + out.datatype + " [" + out.shape.join(", ") + "]"];
      const winners = [];
      for (let r = 0; r * width < out.data.length; r++) {
        const row = out.data.slice(r * width, (r + 1) * width);
        winners.push(row.indexOf(Math.max(...row)));
        lines.push("row " + r + ": " + row.map(v => typeof v === "number" ? v.toFixed(3) : v).join("  "));
      }
      output.textContent = lines.join("\n");
      if (out.shape.length === 2) {
        argmax.textContent = "argmax per row: " + winners.join(", ");
        argmax.dataset.argmax = winners.join(",");
      }
    } catch (err) {
      output.textContent = "Error " + (err.status || "") + ": " + err.message;
    }
  });
  choose(location.hash ? decodeURIComponent(location.hash.slice(1)) : null);
}

// -- server page ----------------------------------------------------------------------------------------------

async function serverPage() {
  let info;
  try { info = await api("/api/server"); } catch (err) { showError(main, err); return; }
  const kv = pairs => el("dl", { class: "kv" }, pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  const budget = info.budget
    ? kv([["budget", fmtNum(info.budget.budget_glm, 4) + " GLM"], ["spent", fmtNum(info.budget.spent_glm, 6) + " GLM"], ["left", fmtNum(info.budget.left_glm, 6) + " GLM"]])
    : el("p", { class: "muted" }, "The " + info.training.backend + " backend charges nothing; no budget applies.");
  const states = Object.entries(info.jobs_by_state).map(([s, n]) => el("div", {}, badge(s), " ", n));
  main.replaceChildren(el("div", { class: "toolbar" }, el("h1", {}, "Server"), el("span", { class: "muted" }, "up " + fmtAge(info.started_at))),
    el("div", { class: "tiles" },
      el("div", { class: "card tile", id: "training" }, el("h2", {}, "Training"), el("div", { class: "big" }, plural(info.training.workers, "worker")),
        kv([["backend", info.training.backend], ["task attempts", "up to " + info.max_task_attempts]])),
      el("div", { class: "card tile", id: "inference" }, el("h2", {}, "Inference"), el("div", { class: "big" }, plural(info.inference.workers, "worker")),
        kv([["backend", info.inference.backend], ["threads per worker", info.inference.threads_per_worker], ["shared memory", info.inference.shared_memory ? "on" : "off"]])),
      el("div", { class: "card tile", id: "budget" }, el("h2", {}, "Golem budget"), budget),
      el("div", { class: "card tile" }, el("h2", {}, "Jobs"), el("div", { class: "big" }, Object.values(info.jobs_by_state).reduce((a, b) => a + b, 0)), ...states),
      el("div", { class: "card tile" }, el("h2", {}, "Models"), el("div", { class: "big" }, plural(info.models, "model version")), el("a", { href: "/models" }, "see models")),
      el("div", { class: "card tile" }, el("h2", {}, "Endpoints"),
        kv([["gRPC", el("span", { class: "mono" }, info.grpc_target)], ["OIP REST", el("a", { href: "/v2" }, "/v2")], ["metrics", el("a", { href: "/metrics" }, "/metrics")],
          ["upload limit", fmtBytes(info.max_upload_bytes)], ["live streams", info.live_streams]]))),
    await blockedProviders());
}

// Providers the server refuses after repeated failures (admin only: other roles see no section).
async function blockedProviders() {
  let body;
  try { body = await api("/api/providers/blocked"); } catch (err) { return el("span", {}); }
  const rows = body.providers.map(p => el("tr", {},
    el("td", { class: "mono" }, p.name), el("td", {}, p.backend), el("td", { class: "num" }, p.failures),
    el("td", {}, p.reason), el("td", {}, fmtAge(p.blocked_at))));
  return el("div", { class: "card", id: "blocked-providers" }, el("h2", {}, "Blocked providers"),
    rows.length
      ? el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "Provider"), el("th", {}, "Backend"),
          el("th", { class: "num" }, "Failures"), el("th", {}, "Reason"), el("th", {}, "Blocked"))), el("tbody", {}, ...rows))
      : el("p", { class: "muted" }, "None: every provider may get work."));
}

const PAGES = { jobs: jobsPage, job: jobPage, submit: submitPage, models: modelsPage, server: serverPage };
(PAGES[page] || (() => {}))().catch(err => showError(main, err));
