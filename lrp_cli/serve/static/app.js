// The page of `lrp-heatmap serve`: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const editor = $("editor");
const context = editor.getContext("2d");
const MAX_VIEW = 448; // longest side of the editor canvas, in CSS pixels
const MAX_SIDE = 2048; // photos larger than this are scaled down before they are sent

const state = {
  info: null,
  source: null, // what is drawn: an ImageBitmap, or the <video> while the webcam runs
  upload: null, // the Blob sent as the photo
  patches: [], // {kind, x, y, w, h, color | seed}: fractions of the photo
  patchImage: null, // {blob, bitmap}
  busy: false,
  again: false,
  seed: 1,
  drag: null,
  webcam: null, // {stream, frames, started}
  result: null,
};

function setStatus(text, mode) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = mode;
}

function options() {
  return {
    composite: $("composite").value,
    topk: Number($("topk").value),
    patches: state.patches.filter((p) => p.w > 0 && p.h > 0).map(({ kind, x, y, w, h, color, seed }) => {
      const patch = { kind, x, y, w, h };
      if (kind === "solid") patch.color = color;
      if (kind === "noise") patch.seed = seed;
      return patch;
    }),
  };
}

async function request(photo) {
  const form = new FormData();
  form.append("image", photo, "image");
  form.append("options", JSON.stringify(options()));
  if (state.patchImage && state.patches.some((p) => p.kind === "image")) {
    form.append("patch_image", state.patchImage.blob, "patch");
  }
  const response = await fetch("/api/explain", { method: "POST", body: form });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function show(answer) {
  state.result = answer;
  $("heatmap").src = answer.heatmap;
  $("overlay").src = answer.overlay;
  const list = $("top5");
  list.replaceChildren(
    ...answer.top.map((entry) => {
      const item = document.createElement("li");
      item.dataset.index = entry.index;
      item.dataset.probability = entry.probability;
      item.textContent = `${entry.label} ${(100 * entry.probability).toFixed(1)}%`;
      const bar = document.createElement("div");
      bar.className = "bar";
      bar.style.width = `${Math.max(1, 100 * entry.probability)}%`;
      item.append(bar);
      return item;
    }),
  );
  $("explained").textContent =
    `explained: ${answer.label} (${(100 * answer.probability).toFixed(1)}%), ${answer.composite}, ` +
    `top-k ${answer.topk}, relevance sum ${answer.relevance_sum.toPrecision(3)}, ${answer.ms.toFixed(0)} ms`;
  $("save-heatmap").disabled = $("save-overlay").disabled = false;
}

// One request at a time; changes made meanwhile are sent when it returns (the newest state only).
async function explain() {
  if (!state.upload || state.webcam) return;
  if (state.busy) {
    state.again = true;
    return;
  }
  state.busy = true;
  setStatus("explaining...", "busy");
  try {
    const answer = await request(state.upload);
    show(answer);
    if (!state.again) setStatus(`done (${state.patches.length} patches)`, "done");
  } catch (error) {
    setStatus(`error: ${error.message}`, "error");
  }
  state.busy = false;
  if (state.again) {
    state.again = false;
    explain();
  }
}

function viewSize(width, height) {
  const scale = MAX_VIEW / Math.max(width, height);
  return [Math.round(width * scale), Math.round(height * scale)];
}

function noise(width, height, seed) {
  // a preview only: the server draws the patch's noise from its seed
  const image = context.createImageData(width, height);
  let value = seed * 2654435761;
  for (let i = 0; i < image.data.length; i += 4) {
    for (let c = 0; c < 3; c++) {
      value = (value * 1103515245 + 12345) >>> 0;
      image.data[i + c] = value >>> 24;
    }
    image.data[i + 3] = 255;
  }
  return image;
}

function draw() {
  if (!state.source) return;
  const { width, height } = editor;
  context.filter = "none";
  context.drawImage(state.source, 0, 0, width, height);
  for (const patch of state.patches) {
    const x = patch.x * width, y = patch.y * height, w = Math.max(1, patch.w * width), h = Math.max(1, patch.h * height);
    if (patch.kind === "solid") {
      context.fillStyle = patch.color;
      context.fillRect(x, y, w, h);
    } else if (patch.kind === "blur") {
      context.save();
      context.beginPath();
      context.rect(x, y, w, h);
      context.clip();
      context.filter = `blur(${Math.max(1, 0.25 * Math.min(w, h))}px)`;
      context.drawImage(state.source, 0, 0, width, height);
      context.restore();
    } else if (patch.kind === "noise") {
      context.putImageData(noise(Math.round(w), Math.round(h), patch.seed), Math.round(x), Math.round(y));
    } else if (state.patchImage) {
      context.drawImage(state.patchImage.bitmap, x, y, w, h);
    }
    context.setLineDash([4, 3]);
    context.strokeStyle = "#fff";
    context.strokeRect(x + 0.5, y + 0.5, w - 1, h - 1);
    context.setLineDash([]);
  }
  $("patch-count").textContent = `${state.patches.length} patches`;
}

async function loadPhoto(file) {
  if (!file) return;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (error) {
    setStatus(`error: ${file.name || "the file"} is not an image the browser can read`, "error");
    return;
  }
  let upload = file;
  if (Math.max(bitmap.width, bitmap.height) > MAX_SIDE || file.size > state.info.max_upload / 2) {
    const scale = MAX_SIDE / Math.max(bitmap.width, bitmap.height);
    const canvas = new OffscreenCanvas(Math.round(bitmap.width * Math.min(1, scale)), Math.round(bitmap.height * Math.min(1, scale)));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    upload = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.92 });
  }
  stopWebcam();
  state.source = bitmap;
  state.upload = upload;
  [editor.width, editor.height] = viewSize(bitmap.width, bitmap.height);
  $("hint").hidden = true;
  draw();
  explain();
}

function point(event) {
  const box = editor.getBoundingClientRect();
  return [
    Math.min(1, Math.max(0, (event.clientX - box.left) / box.width)),
    Math.min(1, Math.max(0, (event.clientY - box.top) / box.height)),
  ];
}

function hit(x, y) {
  for (let i = state.patches.length - 1; i >= 0; i--) {
    const p = state.patches[i];
    if (x >= p.x && x <= p.x + p.w && y >= p.y && y <= p.y + p.h) return i;
  }
  return -1;
}

function newPatch(x, y, w, h) {
  if (state.patches.length >= state.info.max_patches) {
    setStatus(`at most ${state.info.max_patches} patches`, "error");
    return null;
  }
  const kind = $("kind").value;
  if (kind === "image" && !state.patchImage) {
    setStatus("pick a patch image first", "error");
    return null;
  }
  const patch = { kind, x, y, w, h, color: $("color").value, seed: state.seed++ };
  state.patches.push(patch);
  return patch;
}

function clampPatch(p) {
  p.w = Math.min(1, Math.max(0.005, p.w));
  p.h = Math.min(1, Math.max(0.005, p.h));
  p.x = Math.min(1 - p.w, Math.max(0, p.x));
  p.y = Math.min(1 - p.h, Math.max(0, p.y));
}

function brushSize() {
  return Number($("size").value) / 100;
}

function paintAt(x, y) {
  const side = brushSize();
  const patch = newPatch(x - side / 2, y - side / 2, side, side);
  if (patch) clampPatch(patch);
}

editor.addEventListener("mousedown", (event) => {
  if (!state.source) return;
  event.preventDefault();
  const [x, y] = point(event);
  if ($("tool").value === "paint") {
    state.drag = { mode: "paint", last: [x, y] };
    paintAt(x, y);
  } else {
    const index = hit(x, y);
    if (index >= 0) {
      const p = state.patches[index];
      state.drag = { mode: "move", patch: p, dx: x - p.x, dy: y - p.y };
    } else {
      const patch = newPatch(x, y, 0, 0);
      if (patch) state.drag = { mode: "box", patch, start: [x, y] };
    }
  }
  draw();
  explain();
});

window.addEventListener("mousemove", (event) => {
  const drag = state.drag;
  if (!drag) return;
  const [x, y] = point(event);
  if (drag.mode === "paint") {
    const side = brushSize();
    if (Math.hypot(x - drag.last[0], y - drag.last[1]) < side / 2) return;
    drag.last = [x, y];
    paintAt(x, y);
  } else if (drag.mode === "move") {
    drag.patch.x = x - drag.dx;
    drag.patch.y = y - drag.dy;
    clampPatch(drag.patch);
  } else {
    const [sx, sy] = drag.start;
    Object.assign(drag.patch, { x: Math.min(sx, x), y: Math.min(sy, y), w: Math.abs(x - sx), h: Math.abs(y - sy) });
  }
  draw();
  explain();
});

window.addEventListener("mouseup", () => {
  const drag = state.drag;
  state.drag = null;
  if (drag && drag.mode === "box") {
    const p = drag.patch;
    if (p.w < 0.01 && p.h < 0.01) {
      // a click: a square of the brush size centred on it
      const side = brushSize();
      Object.assign(p, { x: p.x - side / 2, y: p.y - side / 2, w: side, h: side });
    }
    clampPatch(p);
    draw();
    explain();
  }
});

editor.addEventListener("wheel", (event) => {
  const [x, y] = point(event);
  const index = hit(x, y);
  if (index < 0) return;
  event.preventDefault();
  const p = state.patches[index];
  const factor = event.deltaY < 0 ? 1.1 : 1 / 1.1;
  const cx = p.x + p.w / 2, cy = p.y + p.h / 2;
  p.w *= factor;
  p.h *= factor;
  p.x = cx - p.w / 2;
  p.y = cy - p.h / 2;
  clampPatch(p);
  draw();
  explain();
}, { passive: false });

editor.addEventListener("dblclick", (event) => {
  const [x, y] = point(event);
  const index = hit(x, y);
  if (index < 0) return;
  state.patches.splice(index, 1);
  draw();
  explain();
});

const drop = $("drop");
drop.addEventListener("dragover", (event) => {
  event.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  loadPhoto(event.dataTransfer.files[0]);
});
$("file").addEventListener("change", (event) => loadPhoto(event.target.files[0]));
$("patch-file").addEventListener("change", async (event) => {
  const file = event.target.files[0];
  if (!file) return;
  try {
    state.patchImage = { blob: file, bitmap: await createImageBitmap(file) };
  } catch (error) {
    setStatus("error: the patch image is not an image the browser can read", "error");
    return;
  }
  $("kind").value = "image";
  draw();
  explain();
});
$("clear").addEventListener("click", () => {
  state.patches = [];
  draw();
  explain();
});
$("size").addEventListener("input", () => ($("size-value").textContent = `${$("size").value}%`));
for (const id of ["composite", "topk"]) $(id).addEventListener("change", explain);

function save(kind) {
  if (!state.result) return;
  const link = document.createElement("a");
  link.href = state.result[kind];
  link.download = kind === "heatmap" ? "heatmap.png" : "overlay.jpg";
  link.click();
}
$("save-heatmap").addEventListener("click", () => save("heatmap"));
$("save-overlay").addEventListener("click", () => save("overlay"));

// Webcam: frames go through the same engine, one request at a time, as fast as it answers.
async function startWebcam() {
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
  } catch (error) {
    setStatus(`webcam not available: ${error.message}`, "error");
    return;
  }
  const video = $("video");
  video.srcObject = stream;
  await video.play();
  state.webcam = { stream, frames: 0, started: performance.now() };
  state.source = video;
  [editor.width, editor.height] = viewSize(video.videoWidth, video.videoHeight);
  $("hint").hidden = true;
  $("webcam").textContent = "Stop webcam";
  const grab = new OffscreenCanvas(video.videoWidth, video.videoHeight);
  while (state.webcam && state.webcam.stream === stream) {
    grab.getContext("2d").drawImage(video, 0, 0);
    draw();
    const frame = await grab.convertToBlob({ type: "image/jpeg", quality: 0.85 });
    try {
      show(await request(frame));
    } catch (error) {
      setStatus(`error: ${error.message}`, "error");
      break;
    }
    if (!state.webcam || state.webcam.stream !== stream) break;
    const frames = ++state.webcam.frames;
    const seconds = (performance.now() - state.webcam.started) / 1000;
    $("fps").dataset.frames = frames;
    $("fps").textContent = `webcam: ${frames} frames, ${(frames / seconds).toFixed(1)} frames/s`;
    setStatus("webcam streaming", "done");
  }
}

function stopWebcam() {
  if (!state.webcam) return;
  for (const track of state.webcam.stream.getTracks()) track.stop();
  state.webcam = null;
  state.source = null;
  $("webcam").textContent = "Start webcam";
}

$("webcam").addEventListener("click", () => {
  if (state.webcam) {
    stopWebcam();
    setStatus("webcam stopped", "idle");
  } else {
    startWebcam();
  }
});

async function liveStatus() {
  try {
    const status = await (await fetch("/api/live")).json();
    $("live-status").textContent = `${status.source}: ${status.frames} frames, ${status.fps} frames/s, ${status.label}`;
    if (!status.finished) setTimeout(liveStatus, 1000);
  } catch (error) {
    $("live-status").textContent = "stream ended";
  }
}

async function start() {
  state.info = await (await fetch("/api/info")).json();
  $("model").textContent = `${state.info.model}, ${state.info.resolution} px`;
  const select = $("composite");
  for (const name of state.info.composites) select.add(new Option(name, name));
  select.value = state.info.composite;
  const topk = $("topk");
  if (![...topk.options].some((o) => Number(o.value) === state.info.topk)) {
    topk.add(new Option(String(state.info.topk), String(state.info.topk)));
  }
  topk.value = [...topk.options].find((o) => Number(o.value) === state.info.topk).value;
  if (state.info.live) {
    $("live").hidden = false;
    $("live-stream").src = "/live.mjpeg";
    liveStatus();
  }
  document.body.dataset.ready = "true";
}

start();
