// catsdogs serve: one card per photo, filled from POST /api/predict (one request per photo).
"use strict";

const results = document.getElementById("results");
const drop = document.getElementById("drop");
const picker = document.getElementById("picker");
let limits = null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function figure(src, caption, cls) {
  const fig = el("figure");
  const img = el("img", cls);
  img.src = src;
  img.alt = caption;
  fig.append(img, el("figcaption", "", caption));
  return fig;
}

async function loadModel() {
  const line = document.getElementById("model-line");
  try {
    const health = await (await fetch("/healthz")).json();
    limits = health.limits;
    const cam = health.cam ? "with CAM overlays" : "no CAM head";
    line.textContent = `model ${health.run_id} (${health.backend}, ${cam}) `;
    const link = el("a", "", "manifest");
    link.href = "/model";
    line.append(link);
    document.getElementById("limits").textContent =
      `JPEG, PNG, WebP, GIF, BMP or TIFF; up to ${limits.max_upload_mb} MB each`;
  } catch (err) {
    line.textContent = `the server does not answer (${err})`;
  }
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("failed");
  card.dataset.state = "error";
  card.querySelector(".verdict").textContent = "Could not use this file";
  card.append(el("div", "error", message));
}

function showPrediction(card, row) {
  card.classList.remove("pending");
  card.dataset.state = "done";
  const verdict = card.querySelector(".verdict");
  verdict.textContent = "";
  const label = row.label.charAt(0).toUpperCase() + row.label.slice(1);
  verdict.append(el("span", "label", label),
                 el("span", "confidence", `${(100 * row.confidence).toFixed(2)}%`));
  card.append(el("div", "pdog", `P(dog) = ${row.p_dog.toFixed(4)}`));
  if (row.neither === true) {
    card.append(el("div", "neither warning",
      `\u26a0 Neither cat nor dog? Neither score ${row.neither_score.toFixed(3)} is above the ` +
      `threshold ${row.neither_threshold.toFixed(3)}: the label above is a guess.`));
  } else if (row.neither === false) {
    card.append(el("div", "neither ok",
      `Looks like a cat or dog photo (neither score ${row.neither_score.toFixed(3)} \u2264 ` +
      `${row.neither_threshold.toFixed(3)})`));
  }
  if (row.cam) {
    card.querySelector(".pics").append(figure(row.cam, "where the model looked (CAM)", "cam"));
  }
}

function newCard(file) {
  const card = el("article", "card pending");
  card.dataset.file = file.name;
  card.dataset.state = "pending";
  const pics = el("div", "pics");
  pics.append(figure(URL.createObjectURL(file), "your photo", "photo"));
  pics.querySelector("img").addEventListener("error", (e) => e.target.closest("figure").remove());
  card.append(pics, el("div", "verdict", "thinking ..."), el("div", "filename", file.name));
  return card;
}

async function predict(file, card) {
  if (limits && file.size > limits.max_upload_mb * 1024 * 1024) {
    showError(card, `413: larger than the upload limit of ${limits.max_upload_mb} MB`);
    return;
  }
  const body = new FormData();
  body.append("file", file, file.name);
  try {
    const response = await fetch("/api/predict", { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) {
      showError(card, `${response.status}: ${answer.detail}`);
    } else if (answer[0].error) {
      showError(card, answer[0].error);
    } else {
      showPrediction(card, answer[0]);
    }
  } catch (err) {
    showError(card, `request failed: ${err}`);
  }
}

function handle(files) {
  const cards = Array.from(files, (file) => [file, newCard(file)]);
  results.prepend(...cards.map(([, card]) => card));  // newest batch first, in the chosen order
  for (const [file, card] of cards) predict(file, card);
}

picker.addEventListener("change", () => { handle(picker.files); picker.value = ""; });
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));
loadModel();
