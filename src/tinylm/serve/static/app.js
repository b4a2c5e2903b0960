// tinylm playground: streams /v1/completions, shows token probabilities, attention and the run card.
"use strict";

const $ = (id) => document.getElementById(id);
let modelName = null;
let controller = null;
let attention = null; // {context, generated, attention: [step][layer][head][position]}

const show = (s) => s.replace(/\n/g, "⏎").replace(/ /g, "␣") || "∅";
const pct = (lp) => (100 * Math.exp(lp)).toFixed(1) + "%";
// a generated token's probability as one of five bands (classes .p0-.p4 in style.css), pale to strong
const PROB_BANDS = [[0.8, "p0", "≥ 80%"], [0.5, "p1", "50–80%"], [0.2, "p2", "20–50%"], [0.05, "p3", "5–20%"], [0, "p4", "< 5%"]];
const band = (p) => PROB_BANDS.find(([low]) => p >= low) || PROB_BANDS[PROB_BANDS.length - 1];
// the inputs the run card's "sampling" (the server's SampleConfig) fills in
const SAMPLING_INPUTS = { max_new_tokens: "max_tokens", temperature: "temperature", top_k: "top_k", top_p: "top_p", repetition_penalty: "repetition_penalty" };

async function init() {
  const models = await (await fetch("/v1/models")).json();
  modelName = models.data[0].id;
  $("model-name").textContent = modelName;
  $("generate").addEventListener("click", run);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("layer").addEventListener("change", drawHeatmap);
  $("head").addEventListener("change", drawHeatmap);
  drawProbLegend();
  loadRunCard();
  pollHealth();
}

function drawProbLegend() {
  for (const [, cls, label] of PROB_BANDS) {
    const key = document.createElement("span");
    key.className = `tok ${cls}`;
    key.textContent = label;
    $("prob-legend").appendChild(key);
  }
}

async function pollHealth() {
  try {
    const h = await (await fetch("/health")).json();
    $("health").className = "badge ok";
    $("health").textContent = `● ${h.active} active, ${h.waiting} waiting`;
  } catch (e) {
    $("health").className = "badge down";
    $("health").textContent = "● offline";
  }
  setTimeout(pollHealth, 2000);
}

function number(id) {
  const v = $(id).value;
  return v === "" ? null : Number(v);
}

function requestBody(prompt) {
  const body = {
    model: modelName, prompt, stream: true,
    max_tokens: number("max_tokens"), temperature: number("temperature"), top_p: number("top_p"),
    top_k: number("top_k"), repetition_penalty: number("repetition_penalty"),
    logprobs: number("alternatives") ?? 0,
  };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  return body;
}

async function run() {
  const prompt = $("prompt").value;
  const out = $("output");
  out.dataset.state = "streaming";
  out.querySelector(".prompt-text").textContent = prompt;
  const gen = out.querySelector(".generated");
  gen.textContent = "";
  $("token-detail").textContent = "Hover a generated token.";
  $("generate").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "generating…";
  controller = new AbortController();
  let tokens = 0;
  const started = performance.now();
  try {
    const resp = await fetch("/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody(prompt)), signal: controller.signal,
    });
    if (!resp.ok) throw new Error((await resp.json()).error.message);
    for await (const chunk of sseChunks(resp)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      const lp = choice.logprobs;
      if (lp && lp.tokens.length) {
        lp.tokens.forEach((t, i) => gen.appendChild(tokenSpan(t, lp.token_logprobs[i], lp.top_logprobs[i])));
        tokens += lp.tokens.length;
      } else if (choice.text) {
        gen.appendChild(document.createTextNode(choice.text));
      }
      if (choice.finish_reason) $("status").textContent = `finished: ${choice.finish_reason}`;
    }
    const secs = (performance.now() - started) / 1000;
    $("status").textContent += ` · ${tokens} tokens in ${secs.toFixed(2)} s`;
    out.dataset.state = "done";
    loadAttention(prompt, Math.max(1, Math.min(tokens, 16)));
  } catch (e) {
    out.dataset.state = e.name === "AbortError" ? "stopped" : "error";
    $("status").textContent = e.name === "AbortError" ? "stopped" : `error: ${e.message}`;
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

async function* sseChunks(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function tokenSpan(text, logprob, top) {
  const span = document.createElement("span");
  const p = Math.exp(logprob);
  span.className = `tok ${band(p)[1]}` + (text.includes("\n") ? " nl" : "");
  span.textContent = text;
  span.dataset.p = p.toFixed(4);
  span.title = `${show(text)}: ${pct(logprob)}`;
  span.addEventListener("mouseenter", () => detail(span, text, logprob, top));
  return span;
}

function detail(span, text, logprob, top) {
  document.querySelectorAll(".tok.selected").forEach((s) => s.classList.remove("selected"));
  span.classList.add("selected");
  const rows = Object.entries(top || {}).sort((a, b) => b[1] - a[1]).map(([t, lp]) =>
    `<tr><td>${escapeHtml(show(t))}</td><td>${pct(lp)}</td>` +
    `<td><div class="bar" style="width:${(120 * Math.exp(lp)).toFixed(1)}px"></div></td></tr>`).join("");
  $("token-detail").innerHTML =
    `<b>${escapeHtml(show(text))}</b> had probability ${pct(logprob)}; top alternatives:<table>${rows}</table>`;
}

function escapeHtml(s) {
  return s.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
}

async function loadAttention(prompt, n) {
  $("attention-status").textContent = "computing…";
  const resp = await fetch("/v1/playground/attention", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ prompt, n_tokens: n }),
  });
  const data = await resp.json();
  if (!resp.ok) { $("attention-status").textContent = data.error.message; return; }
  attention = data;
  const [L, H] = [data.attention[0].length, data.attention[0][0].length];
  $("layer").innerHTML = `<option value="mean">mean</option>` + [...Array(L).keys()].map((l) => `<option value="${l}">${l}</option>`).join("");
  $("head").innerHTML = `<option value="mean">mean</option>` + [...Array(H).keys()].map((h) => `<option value="${h}">${h}</option>`).join("");
  $("attention-status").textContent = `${data.generated.length} greedy tokens: ${show(data.generated.join(""))}`;
  drawHeatmap();
}

function weight(step, layer, head, pos) {
  const layers = layer === "mean" ? step.map((_, i) => i) : [Number(layer)];
  let sum = 0, count = 0;
  for (const l of layers) {
    const heads = head === "mean" ? step[l].map((_, i) => i) : [Number(head)];
    for (const h of heads) { sum += step[l][h][pos] ?? 0; count += 1; }
  }
  return sum / count;
}

function drawHeatmap() {
  if (!attention) return;
  const labels = attention.context.concat(attention.generated).map(show);
  const rows = attention.generated.length;
  const cols = attention.attention[rows - 1][0][0].length;
  const cell = 18, left = 70, top = 64;
  const canvas = $("heatmap");
  canvas.width = left + cols * cell + 10;
  canvas.height = top + rows * cell + 10;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "11px ui-monospace, Menlo, monospace";
  const layer = $("layer").value, head = $("head").value;
  for (let r = 0; r < rows; r++) {
    const step = attention.attention[r];
    const width = step[0][0].length;
    let peak = 0;
    for (let c = 0; c < width; c++) peak = Math.max(peak, weight(step, layer, head, c));
    for (let c = 0; c < cols; c++) {
      const w = c < width ? weight(step, layer, head, c) / (peak || 1) : 0;
      ctx.fillStyle = c < width ? viridis(w) : "#f0f0f0";
      ctx.fillRect(left + c * cell, top + r * cell, cell - 1, cell - 1);
    }
    ctx.fillStyle = "#1d2330";
    ctx.textAlign = "right";
    ctx.fillText(attention.generated[r] ? show(attention.generated[r]).slice(0, 8) : "", left - 6, top + r * cell + 13);
  }
  ctx.save();
  ctx.textAlign = "left";
  for (let c = 0; c < cols; c++) {
    ctx.save();
    ctx.translate(left + c * cell + 12, top - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.fillStyle = c < attention.context.length ? "#6b7385" : "#3a5ccc";
    ctx.fillText(labels[c].slice(0, 8), 0, 0);
    ctx.restore();
  }
  ctx.restore();
  canvas.dataset.cells = String(rows * cols);
}

function viridis(t) {
  // a few stops of matplotlib's viridis, linearly interpolated
  const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x)), f = x - i;
  const c = stops[i].map((v, k) => Math.round(v + f * (stops[i + 1][k] - v)));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

async function loadRunCard() {
  const card = await (await fetch("/v1/playground/run")).json();
  for (const [field, id] of Object.entries(SAMPLING_INPUTS)) {
    if ($(id).value === "" && card.sampling && card.sampling[field] != null) $(id).value = card.sampling[field];
  }
  const cfg = card.config || {};
  const facts = {
    model: card.model,
    parameters: card.parameters.toLocaleString(),
    shape: `${cfg.n_layer} layers × ${cfg.n_head} heads × ${cfg.n_embd} wide, context ${cfg.block_size}`,
    flavour: `${cfg.position} positions, ${cfg.norm}, ${cfg.mlp}${cfg.n_expert ? `, ${cfg.n_expert} experts` : ""}`,
    tokenizer: `${card.tokenizer} (vocabulary ${card.vocab_size})`,
    "trained steps": card.step ?? "?",
    "validation loss": card.val_loss == null ? "—" : Number(card.val_loss).toFixed(4),
  };
  $("card-facts").innerHTML = Object.entries(facts)
    .map(([k, v]) => `<dt>${k}</dt><dd>${escapeHtml(String(v))}</dd>`).join("");
  $("card-config").textContent = JSON.stringify({ model: card.config, train: card.train }, null, 2);
  drawCurve(card.train_curve, card.val_curve);
}

function drawCurve(train, val) {
  const svg = $("loss-curve");
  const all = train.concat(val);
  if (!all.length) { svg.innerHTML = `<text x="10" y="20" font-size="12">no metrics.jsonl</text>`; return; }
  const W = 480, H = 200, pad = 30;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const X = (x) => pad + ((x - x0) / ((x1 - x0) || 1)) * (W - pad - 8);
  const Y = (y) => 8 + (1 - (y - y0) / ((y1 - y0) || 1)) * (H - pad - 8);
  const path = (pts) => pts.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
  svg.innerHTML =
    `<path d="${path(train)}" fill="none" stroke="#3a5ccc" stroke-width="1.5"/>` +
    `<path d="${path(val)}" fill="none" stroke="#e8862a" stroke-width="2"/>` +
    val.map((p) => `<circle cx="${X(p[0])}" cy="${Y(p[1])}" r="3" fill="#e8862a"/>`).join("") +
    `<text x="${pad}" y="${H - 8}" font-size="10" fill="#6b7385">step ${x0} … ${x1}</text>` +
    `<text x="2" y="14" font-size="10" fill="#6b7385">${y1.toFixed(2)}</text>` +
    `<text x="2" y="${H - pad}" font-size="10" fill="#6b7385">${y0.toFixed(2)}</text>` +
    `<text x="${W - 150}" y="16" font-size="11" fill="#3a5ccc">train</text>` +
    `<text x="${W - 100}" y="16" font-size="11" fill="#e8862a">validation</text>`;
}

init();
