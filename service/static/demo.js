// Demo page: upload an image + prompt to /v1/detect/upload, draw the returned boxes
// (xyxy pixels of the original image) on a canvas at the image's own resolution; ask a
// question about the same image (/v1/vqa/upload) or caption it (/v1/caption/upload; grounded:
// the caption's object phrases drawn with their boxes).
"use strict";
const BOX_COLOUR = "#00ffff";  // cyan: none of the shapes world's colours
const $ = (id) => document.getElementById(id);

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// The API's errors are {"detail": "..."} or, for validation errors, {"detail": [{loc, msg}, ...]}.
function errorText(status, body) {
  const d = body && body.detail;
  if (typeof d === "string") return d;
  if (Array.isArray(d)) return d.map((e) => (e.loc ? e.loc.join(".") + ": " : "") + e.msg).join("; ");
  return "HTTP " + status;
}

function loadImage(file) {
  return new Promise((resolve, reject) => {
    const url = URL.createObjectURL(file);
    const img = new Image();
    img.onload = () => { URL.revokeObjectURL(url); resolve(img); };
    img.onerror = () => { URL.revokeObjectURL(url); reject(new Error("the browser cannot display this image")); };
    img.src = url;
  });
}

function draw(img, detections) {
  const canvas = $("canvas"), ctx = canvas.getContext("2d");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  ctx.drawImage(img, 0, 0);
  const lw = Math.max(2, Math.round(Math.min(canvas.width, canvas.height) / 200));
  ctx.lineWidth = lw;
  ctx.font = "bold 12px sans-serif";
  ctx.textBaseline = "bottom";
  for (const d of detections) {
    const [x0, y0, x1, y1] = d.box;
    ctx.strokeStyle = BOX_COLOUR;
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const label = d.phrase + " " + d.score.toFixed(2);
    const tw = ctx.measureText(label).width + 6;
    const ty = y0 - 16 >= 0 ? y0 - 16 : y0;  // above the box, or inside it at the image top
    ctx.fillStyle = BOX_COLOUR;
    ctx.fillRect(x0, ty, tw, 16);
    ctx.fillStyle = "#000";
    ctx.fillText(label, x0 + 3, ty + 15);
  }
}

function fillTable(detections) {
  const body = $("results-body");
  body.replaceChildren();
  detections.forEach((d, i) => {
    const tr = document.createElement("tr");
    tr.className = "detection";
    tr.dataset.box = JSON.stringify(d.box);
    tr.dataset.phrase = d.phrase;
    tr.dataset.score = String(d.score);
    for (const [text, cls] of [[String(i + 1), "num"], [d.phrase, "phrase"], [d.score.toFixed(3), "num score"],
                               [d.box.map((v) => v.toFixed(1)).join(", "), "num box"]]) {
      const td = document.createElement("td");
      td.textContent = text;
      td.className = cls;
      tr.appendChild(td);
    }
    body.appendChild(tr);
  });
  $("results").hidden = false;
}

async function detect(event) {
  event.preventDefault();
  showError("");
  const file = $("image").files[0];
  const prompt = $("prompt").value.trim();
  if (!file) return showError("Choose an image first.");
  if (!prompt) return showError("Type a prompt, e.g. \"circle. star.\"");
  const form = new FormData();
  form.append("image", file);
  form.append("prompt", prompt);
  form.append("score_threshold", $("threshold").value);
  const headers = {};
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  $("detect").disabled = true;
  $("status").textContent = "Detecting…";
  $("results").hidden = true;
  document.body.dataset.state = "busy";
  try {
    const resp = await fetch("/v1/detect/upload", { method: "POST", body: form, headers });
    const body = await resp.json().catch(() => null);
    if (!resp.ok) throw new Error(errorText(resp.status, body));
    const result = body.results[0];
    const img = await loadImage(file);
    draw(img, result.detections);
    fillTable(result.detections);
    $("status").textContent = result.detections.length + " detection(s) in " +
      Math.round(body.timings.total_ms) + " ms";
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err.message);
    $("status").textContent = "";
    document.body.dataset.state = "error";
  } finally {
    $("detect").disabled = false;
  }
}

// POST the chosen image + fields to an /upload route; the parsed body, or an Error with the API's message.
async function upload(route, fields) {
  const file = $("image").files[0];
  if (!file) throw new Error("Choose an image first.");
  const form = new FormData();
  form.append("image", file);
  for (const [k, v] of Object.entries(fields)) form.append(k, v);
  const headers = {};
  if ($("api-key").value) headers["X-API-Key"] = $("api-key").value;
  const resp = await fetch(route, { method: "POST", body: form, headers });
  const body = await resp.json().catch(() => null);
  if (!resp.ok) throw new Error(errorText(resp.status, body));
  return body;
}

async function runTask(button, target, busyText, work) {
  showError("");
  button.disabled = true;
  target.textContent = busyText;
  document.body.dataset.state = "busy";
  try {
    target.textContent = await work();
    document.body.dataset.state = "done";
  } catch (err) {
    showError(err.message);
    target.textContent = "";
    document.body.dataset.state = "error";
  } finally {
    button.disabled = false;
  }
}

function ask() {
  return runTask($("ask"), $("answer"), "Thinking…", async () => {
    const question = $("question").value.trim();
    if (!question) throw new Error("Type a question, e.g. \"what color is the star?\"");
    const body = await upload("/v1/vqa/upload", { question, top_k: "3" });
    const r = body.results[0];
    const others = r.top_answers.slice(1).map((a) => a.answer + " " + a.score.toFixed(2)).join(", ");
    return "Answer: " + r.answer + " (" + r.score.toFixed(2) + ")" + (others ? "; then " + others : "");
  });
}

function caption() {
  return runTask($("caption-button"), $("caption"), "Captioning…", async () => {
    const grounded = $("grounded").checked;
    const fields = { grounded: String(grounded), checked: String($("checked").checked) };
    if ($("beam").value) fields.beam_size = $("beam").value;  // empty: the API's default
    const body = await upload("/v1/caption/upload", fields);
    const r = body.results[0];
    if (grounded) {
      // Grounded caption: each object phrase's boxes, drawn and listed like detections.
      const boxes = r.phrases.flatMap((p) => p.boxes.map((b) => ({ box: b.box, score: b.score, phrase: p.phrase })));
      draw(await loadImage($("image").files[0]), boxes);
      fillTable(boxes);
    }
    return "Caption: " + r.caption;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("click", ask);
  $("caption-button").addEventListener("click", caption);
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  });
  $("detect-form").addEventListener("submit", detect);
});
