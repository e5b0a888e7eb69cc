// Demo page: upload an image + prompt to /v1/detect/upload, draw the returned boxes
// (xyxy pixels of the original image) on a canvas at the image's own resolution.
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

document.addEventListener("DOMContentLoaded", () => {
  $("threshold").addEventListener("input", () => {
    $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
  });
  $("detect-form").addEventListener("submit", detect);
});
