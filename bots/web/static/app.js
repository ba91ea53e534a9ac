// imgbot's page: sign-in, the prompt box and its pickers, references and a mask, jobs with
// progress, results and history. Plain JavaScript, no libraries; it calls only its own server
// (/web/api/…, and /v1/files/… for images). The server reads the command language and prices
// it: this file holds no rule of either.
"use strict";

const TEXTS = {
  en: {
    signInTitle: "Sign in",
    signInHelp: "Paste your personal key. Get one with /key in a private chat with the Telegram bot (or /key on Discord), or ask the operator to run `imgbot keys create`. In Telegram, open this page with the bot's /web button instead.",
    keyLabel: "Personal key",
    signIn: "Sign in",
    signingIn: "Signing in…",
    signOut: "Sign out",
    admin: "operator",
    dashboard: "Dashboard",
    promptLabel: "What to draw — options first, like 16:9 2K high a white cat",
    promptPlaceholder: "16:9 2K high a white siamese cat on a windowsill",
    ratio: "Ratio", tier: "Resolution", quality: "Quality", count: "Count", model: "Model",
    ratioDefault: "default", tierDefault: "default",
    qualityNames: { low: "low", medium: "medium", high: "high", auto: "auto" },
    estimate: "Estimated cost: {cost}",
    writePrompt: "Write what to draw after the options.",
    refsTitle: "References (optional, up to {max})",
    refsHint: "Add images with the button, drop them here, or paste them (Ctrl+V). The first one is the one a mask applies to; drag them or use ◀ ▶ to reorder.",
    addImages: "Add images",
    moveLeft: "Move left", moveRight: "Move right", remove: "Remove",
    notImage: "“{name}” is not an image (PNG, JPEG or WebP).",
    tooManyRefs: "At most {max} references: the rest were not added.",
    maskOpen: "Paint a mask on the first reference",
    maskHide: "Hide the mask",
    maskHelp: "Paint over the parts of the first reference to change; the rest is kept. No paint: no mask.",
    brush: "Brush", maskClear: "Clear mask",
    maskPainted: "The mask will be sent with this edit.",
    maskReset: "The first reference changed, so the mask was cleared.",
    draw: "Draw", cancel: "Cancel",
    starting: "Starting… {seconds} s",
    queued: "In the queue: #{position} · {seconds} s",
    waiting: "In the queue · {seconds} s",
    drawing: "Drawing… {seconds} s",
    drawingPreview: "Drawing… {seconds} s — preview {number}",
    previewMeta: "Preview {number}: still drawing, the result takes its place.",
    doneIn: "Done in {seconds} s",
    resultMeta: "{size} · {quality} · {model} · cost {cost}",
    jobLine: "Job #{id}",
    download: "Download original",
    history: "Your jobs", refresh: "Refresh",
    historyNote: "Every job of yours, from the page, the API or the chats. Originals are kept on this server for an hour after they are drawn on the page (or as API url results); other jobs list their details only.",
    historyEmpty: "No jobs yet.",
    notKept: "original not kept",
    notKeptLong: "The original of this job is not kept on the server (it was drawn in a chat, answered as API b64, or over an hour ago).",
    close: "Close",
    networkError: "The server could not be reached. Check the connection and try again.",
  },
  zh: {
    signInTitle: "登录",
    signInHelp: "粘贴你的个人密钥。在与 Telegram 机器人的私聊中发送 /key（或在 Discord 使用 /key）获取，或请运营者运行 `imgbot keys create`。在 Telegram 中，请改用机器人的 /web 按钮打开本页。",
    keyLabel: "个人密钥",
    signIn: "登录",
    signingIn: "正在登录…",
    signOut: "退出登录",
    admin: "运营者",
    dashboard: "仪表盘",
    promptLabel: "要画什么——选项写在前面，如 16:9 2K high 一只白猫",
    promptPlaceholder: "16:9 2K high 窗台上的一只白色暹罗猫",
    ratio: "比例", tier: "分辨率", quality: "质量", count: "数量", model: "模型",
    ratioDefault: "默认", tierDefault: "默认",
    qualityNames: { low: "低", medium: "中", high: "高", auto: "自动" },
    estimate: "预计花费：{cost}",
    writePrompt: "请在选项后写上要画的内容。",
    refsTitle: "参考图（可选，最多 {max} 张）",
    refsHint: "用按钮添加、拖放到这里，或直接粘贴（Ctrl+V）。遮罩作用于第一张；可拖动或用 ◀ ▶ 调整顺序。",
    addImages: "添加图片",
    moveLeft: "左移", moveRight: "右移", remove: "移除",
    notImage: "“{name}”不是图片（PNG、JPEG 或 WebP）。",
    tooManyRefs: "最多 {max} 张参考图：其余未添加。",
    maskOpen: "在第一张参考图上画遮罩",
    maskHide: "隐藏遮罩",
    maskHelp: "涂抹第一张参考图中要修改的部分，其余保持不变。不涂抹则不发送遮罩。",
    brush: "画笔", maskClear: "清除遮罩",
    maskPainted: "此次编辑将附带遮罩。",
    maskReset: "第一张参考图已变更，遮罩已清除。",
    draw: "画图", cancel: "取消",
    starting: "正在开始… {seconds} 秒",
    queued: "排队中：第 {position} 位 · {seconds} 秒",
    waiting: "排队中 · {seconds} 秒",
    drawing: "正在绘制… {seconds} 秒",
    drawingPreview: "正在绘制… {seconds} 秒 — 预览 {number}",
    previewMeta: "预览 {number}：仍在绘制，完成后由结果替换。",
    doneIn: "用时 {seconds} 秒",
    resultMeta: "{size} · {quality} · {model} · 花费 {cost}",
    jobLine: "任务 #{id}",
    download: "下载原图",
    history: "你的任务", refresh: "刷新",
    historyNote: "你的全部任务，来自网页、API 或聊天。网页上画的图（以及 API 的 url 结果）在服务器上保留一小时；其他任务只显示详情。",
    historyEmpty: "还没有任务。",
    notKept: "原图未保留",
    notKeptLong: "此任务的原图未保存在服务器上（在聊天中绘制、API 以 b64 返回，或已超过一小时）。",
    close: "关闭",
    networkError: "无法连接服务器，请检查网络后重试。",
  },
};

const LANG = ((navigator.languages && navigator.languages[0]) || navigator.language || "en")
  .toLowerCase().startsWith("zh") ? "zh" : "en";
const SESSION = "imgbot.session";
const RATIOS = ["", "1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "auto"];
const TIERS = ["", "1K", "2K", "4K"];
const QUALITIES = ["low", "medium", "high", "auto"];
const POLL_MS = 600;

const $ = (id) => document.getElementById(id);

function t(key, params = {}) {
  const entry = TEXTS[LANG][key] ?? TEXTS.en[key] ?? key;
  return typeof entry === "string"
    ? entry.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""))
    : entry;
}

const state = {
  token: null,
  me: null,
  refs: [],          // {id, file, url, width, height}, in the order they are sent
  nextRef: 1,
  estimateSeq: 0,
  fields: null,      // what the pickers show (the server's reading of the text)
  maskFor: null,     // the reference id the mask was painted on
  maskPainted: false,
  job: null,
  jobT0: 0,
  previewSeen: 0,    // the number of the job's latest preview shown (0: none)
  ticker: null,
};

// --- the server -----------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(message, status, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body, form } = {}) {
  const headers = { Accept: "application/json" };
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let payload;
  if (form) {
    payload = form;
  } else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
  } catch {
    throw new ApiFailure(t("networkError"), 0, "network");
  }
  let data = null;
  try { data = await res.json(); } catch { data = null; }
  if (!res.ok) {
    const error = (data && data.error) || {};
    throw new ApiFailure(error.message || `${res.status} ${res.statusText}`, res.status, error.code);
  }
  return data;
}

// --- Telegram Mini App: tell the client we are ready (no SDK: it is not ours to ship) ------

function telegramEvent(type, data = {}) {
  try {
    if (window.TelegramWebviewProxy) {
      window.TelegramWebviewProxy.postEvent(type, JSON.stringify(data));
    } else if (window.parent !== window) {
      window.parent.postMessage(JSON.stringify({ eventType: type, eventData: data }), "https://web.telegram.org");
    }
  } catch { /* not inside Telegram */ }
}

// --- signing in -------------------------------------------------------------------------

function remember(token, store) {
  state.token = token;
  localStorage.removeItem(SESSION);
  sessionStorage.removeItem(SESSION);
  store.setItem(SESSION, token);
}

function forget() {
  state.token = null;
  localStorage.removeItem(SESSION);
  sessionStorage.removeItem(SESSION);
}

function showSignIn(message = "") {
  stopTicker();
  $("studio").hidden = true;
  $("who").hidden = true;
  $("sign-out").hidden = true;
  $("dashboard-link").hidden = true;
  $("spend").textContent = "";
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  $("key-input").focus();
}

async function signIn(path, body, store) {
  const button = $("signin-button");
  button.disabled = true;
  button.textContent = t("signingIn");
  try {
    const answer = await api(path, { method: "POST", body });
    remember(answer.token, store);
    enterStudio(answer.me);
  } catch (err) {
    forget();
    showSignIn(err.message);
  } finally {
    button.disabled = false;
    button.textContent = t("signIn");
  }
}

function signedOut(message) {
  forget();
  showSignIn(message);
}

async function start() {
  applyTexts();
  wire();
  const hash = new URLSearchParams(location.hash.slice(1));
  const initData = hash.get("tgWebAppData");
  const code = hash.get("signin");
  if (initData !== null || code !== null) {
    // Out of the address bar (and any bookmark) at once; neither is ever sent in a URL.
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (initData !== null) {
    telegramEvent("web_app_ready");
    telegramEvent("web_app_expand");
    await signIn("/web/api/session/telegram", { init_data: initData }, sessionStorage);
    return;
  }
  if (code !== null) {
    await signIn("/web/api/session/link", { code }, localStorage);
    return;
  }
  const saved = sessionStorage.getItem(SESSION) || localStorage.getItem(SESSION);
  if (saved) {
    state.token = saved;
    try {
      enterStudio(await api("/web/api/me"));
      return;
    } catch (err) {
      forget();
      showSignIn(err.status === 401 ? err.message : "");
      return;
    }
  }
  showSignIn();
}

function enterStudio(me) {
  state.me = me;
  $("signin").hidden = true;
  $("studio").hidden = false;
  $("who").hidden = false;
  $("who").textContent = me.admin ? `${me.name} (${t("admin")})` : me.name;
  $("who").title = me.user;
  $("sign-out").hidden = false;
  $("dashboard-link").hidden = !me.admin;
  $("spend").textContent = me.spend;
  $("refs").querySelector("[data-t=refsTitle]").textContent = t("refsTitle", { max: me.max_references });
  fillPickers();
  estimate();
  loadHistory();
  $("command").focus();
}

// --- texts ------------------------------------------------------------------------------

function applyTexts() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
  $("command").placeholder = t("promptPlaceholder");
}

// --- pickers and the estimate -------------------------------------------------------------

function option(value, label) {
  const node = document.createElement("option");
  node.value = value;
  node.textContent = label;
  return node;
}

function fillPickers() {
  const me = state.me;
  const fill = (id, items) => $(id).replaceChildren(...items);
  fill("pick-ratio", RATIOS.map((r) => option(r, r || t("ratioDefault"))));
  fill("pick-tier", TIERS.map((v) => option(v, v || `${t("tierDefault")} (${me.defaults.tier})`)));
  fill("pick-quality", QUALITIES.map((q) => option(q, t("qualityNames")[q])));
  fill("pick-n", Array.from({ length: me.max_n }, (_, i) => option(String(i + 1), `×${i + 1}`)));
  fill("pick-model", me.models.map((m) => option(m, m)));
}

function showPickers(fields) {
  state.fields = fields;
  const set = (id, value) => {
    const select = $(id);
    value = String(value);
    if (![...select.options].some((o) => o.value === value)) select.append(option(value, value));
    select.value = value;
  };
  set("pick-ratio", fields.ratio);
  set("pick-tier", fields.tier);
  set("pick-quality", fields.quality);
  set("pick-n", fields.n);
  set("pick-model", fields.model);
}

function referenceSizes() {
  return state.refs.filter((r) => r.width && r.height).map((r) => [r.width, r.height]);
}

let estimateTimer = null;
function estimateSoon() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(() => estimate(), 150);
}

// The pickers the user moved since the last reading: sent with every estimate until one
// answers, so quick changes (or typing meanwhile) never drop one.
function pickerChanges() {
  if (!state.fields) return null;
  const changes = {};
  for (const select of document.querySelectorAll("[data-pick]")) {
    const name = select.dataset.pick;
    if (select.value !== String(state.fields[name])) changes[name] = select.value;
  }
  return Object.keys(changes).length ? changes : null;
}

async function estimate() {
  if (!state.token) return;
  const seq = ++state.estimateSeq;
  const changes = pickerChanges();
  const body = { command: $("command").value, references: referenceSizes() };
  if (changes) body.set = changes;
  try {
    const reading = await api("/web/api/estimate", { method: "POST", body });
    if (seq !== state.estimateSeq) return;
    if (changes) $("command").value = reading.command;
    showPickers(reading.fields);
    $("command-error").textContent = "";
    const line = $("estimate");
    line.replaceChildren(t("estimate", { cost: reading.estimate_text }));
    const size = document.createElement("span");
    size.className = "size";
    size.textContent = ` · ${reading.fields.size}`;
    line.append(size);
    line.dataset.credits = String(reading.estimate);
    const notes = [...reading.notices];
    if (reading.prompt_missing) notes.unshift(t("writePrompt"));
    if (notes.length) {
      const extra = document.createElement("span");
      extra.id = "estimate-notes";
      extra.className = "hint";
      extra.textContent = ` — ${notes.join(" ")}`;
      line.append(extra);
    }
  } catch (err) {
    if (seq !== state.estimateSeq) return;
    if (err.status === 401) return signedOut(err.message);
    $("estimate").textContent = "";
    $("estimate").dataset.credits = "";
    $("command-error").textContent = err.message;
    if (changes && state.fields) showPickers(state.fields); // the choice was refused: undo it
  }
}

// --- references -------------------------------------------------------------------------

function measure(ref) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => { ref.width = img.naturalWidth; ref.height = img.naturalHeight; resolve(); };
    img.onerror = () => resolve();
    img.src = ref.url;
  });
}

async function addFiles(files) {
  const errors = [];
  const added = [];
  const max = state.me.max_references;
  for (const file of files) {
    if (!file) continue;
    if (!/^image\/(png|jpeg|webp)$/.test(file.type)) {
      errors.push(t("notImage", { name: file.name || "?" }));
      continue;
    }
    if (state.refs.length >= max) {
      errors.push(t("tooManyRefs", { max }));
      break;
    }
    const ref = { id: state.nextRef++, file, url: URL.createObjectURL(file), width: 0, height: 0 };
    state.refs.push(ref);
    added.push(measure(ref));
  }
  $("refs-error").textContent = errors.join("\n");
  renderRefs();
  await Promise.all(added);
  renderRefs();
  estimate();
}

function moveRef(index, to) {
  if (to < 0 || to >= state.refs.length || to === index) return;
  const [ref] = state.refs.splice(index, 1);
  state.refs.splice(to, 0, ref);
  renderRefs();
  estimate();
}

function removeRef(index) {
  const [ref] = state.refs.splice(index, 1);
  URL.revokeObjectURL(ref.url);
  renderRefs();
  estimate();
}

function toolButton(label, symbol, action) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = symbol;
  b.title = label;
  b.setAttribute("aria-label", label);
  b.addEventListener("click", action);
  return b;
}

let dragged = null;
function renderRefs() {
  const list = $("ref-list");
  list.replaceChildren(...state.refs.map((ref, index) => {
    const li = document.createElement("li");
    li.draggable = true;
    li.dataset.ref = String(ref.id);
    const img = document.createElement("img");
    img.src = ref.url;
    img.alt = ref.file.name || `#${index + 1}`;
    const num = document.createElement("span");
    num.className = "num";
    num.textContent = String(index + 1);
    const tools = document.createElement("div");
    tools.className = "tools";
    tools.append(
      toolButton(t("moveLeft"), "◀", () => moveRef(index, index - 1)),
      toolButton(t("remove"), "✕", () => removeRef(index)),
      toolButton(t("moveRight"), "▶", () => moveRef(index, index + 1)),
    );
    li.append(img, num, tools);
    li.addEventListener("dragstart", (e) => {
      dragged = ref.id;
      li.classList.add("dragging");
      e.dataTransfer.effectAllowed = "move";
      e.dataTransfer.setData("text/x-imgbot-ref", String(ref.id));
    });
    li.addEventListener("dragend", () => { dragged = null; li.classList.remove("dragging"); });
    li.addEventListener("dragover", (e) => { if (dragged !== null) e.preventDefault(); });
    li.addEventListener("drop", (e) => {
      if (dragged === null) return;
      e.preventDefault();
      e.stopPropagation();
      const from = state.refs.findIndex((r) => r.id === dragged);
      dragged = null;
      moveRef(from, index);
    });
    return li;
  }));
  $("mask-toggle").hidden = state.refs.length === 0;
  updateMask();
}

// --- the mask: painted over the first reference, sent as a PNG of its size ----------------

function updateMask() {
  const first = state.refs[0];
  if (!first) {
    $("mask-box").hidden = true;
    state.maskFor = null;
    state.maskPainted = false;
    return;
  }
  if (state.maskFor === first.id && $("mask-canvas").width === first.width) return;
  const hadPaint = state.maskPainted;
  state.maskFor = first.id;
  state.maskPainted = false;
  $("mask-image").src = first.url;
  const canvas = $("mask-canvas");
  canvas.width = first.width || 1;
  canvas.height = first.height || 1;
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  $("mask-state").textContent = hadPaint ? t("maskReset") : "";
}

function wireMask() {
  const canvas = $("mask-canvas");
  const ctx = canvas.getContext("2d");
  let last = null;
  const point = (e) => {
    const box = canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * canvas.width / box.width,
            (e.clientY - box.top) * canvas.height / box.height];
  };
  const paint = (e) => {
    const [x, y] = point(e);
    const scale = canvas.width / canvas.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = getComputedStyle(document.documentElement).getPropertyValue("--mask") || "red";
    ctx.lineWidth = Number($("brush-size").value) * scale;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    if (last) ctx.moveTo(last[0], last[1]); else ctx.moveTo(x, y);
    ctx.lineTo(x, y);
    ctx.stroke();
    last = [x, y];
    if (!state.maskPainted) {
      state.maskPainted = true;
      $("mask-state").textContent = t("maskPainted");
    }
  };
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); last = null; paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (e.buttons & 1) paint(e); });
  canvas.addEventListener("pointerup", () => { last = null; });
  $("mask-clear").addEventListener("click", () => {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    state.maskPainted = false;
    $("mask-state").textContent = "";
  });
  $("mask-toggle").addEventListener("click", () => {
    const box = $("mask-box");
    box.hidden = !box.hidden;
    $("mask-toggle").textContent = t(box.hidden ? "maskOpen" : "maskHide");
  });
}

function maskFile() {
  // Opaque where kept, transparent where painted: the API edits the transparent part.
  const painted = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = painted.width;
  out.height = painted.height;
  const g = out.getContext("2d");
  g.fillStyle = "#000";
  g.fillRect(0, 0, out.width, out.height);
  g.globalCompositeOperation = "destination-out";
  g.drawImage(painted, 0, 0);
  return new Promise((resolve) => out.toBlob((blob) => resolve(new File([blob], "mask.png", { type: "image/png" })), "image/png"));
}

// --- drawing: a job, its progress, its result ----------------------------------------------

function stopTicker() {
  clearInterval(state.ticker);
  state.ticker = null;
}

function renderProgress() {
  const job = state.job;
  if (!job) return;
  const seconds = Math.floor((performance.now() - state.jobT0) / 1000);
  let key = { queued: "queued", drawing: "drawing" }[job.state] || "starting";
  // A poll answered by another replica knows the job waits, not its place.
  if (key === "queued" && !job.position) key = "waiting";
  if (key === "drawing" && state.previewSeen) key = "drawingPreview";
  $("progress").textContent = t(key, { position: job.position, seconds, number: state.previewSeen });
  $("progress").dataset.state = job.state;
}

function follow(job) {
  state.job = job;
  state.jobT0 = performance.now() - job.elapsed * 1000;
  if (job.preview && job.preview_number > state.previewSeen) showPreview(job);
  renderProgress();
}

// A preview takes the result's place while the job draws; the result (or the end) replaces it.
function showPreview(job) {
  state.previewSeen = job.preview_number;
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.id = "preview-image";
  img.src = job.preview;
  img.alt = t("previewMeta", { number: job.preview_number });
  img.dataset.number = String(job.preview_number);
  fig.append(img);
  $("result-images").replaceChildren(fig);
  $("result-meta").textContent = t("previewMeta", { number: job.preview_number });
  $("result-notes").textContent = "";
  $("result").classList.add("previewing");
  $("result").hidden = false;
}

function dropPreview() {
  if (!$("result").classList.contains("previewing")) return;
  $("result").classList.remove("previewing");
  $("result").hidden = true;
  $("result-images").replaceChildren();
  $("result-meta").textContent = "";
}

async function draw() {
  $("job-error").textContent = "";
  $("draw").disabled = true;
  $("cancel").hidden = false;
  const form = new FormData();
  form.append("command", $("command").value);
  for (const ref of state.refs) form.append("image", ref.file, ref.file.name || "image.png");
  if (state.maskPainted && state.refs.length) form.append("mask", await maskFile());
  state.job = { state: "starting", position: 0, elapsed: 0 };
  state.jobT0 = performance.now();
  state.previewSeen = 0;
  renderProgress();
  state.ticker = setInterval(renderProgress, 250);
  try {
    let job = await api("/web/api/jobs", { method: "POST", form });
    follow(job);
    while (!["done", "refused", "failed"].includes(job.state)) {
      await new Promise((r) => setTimeout(r, POLL_MS));
      job = await api(`/web/api/jobs/${encodeURIComponent(job.handle)}?seen=${state.previewSeen}`);
      follow(job);
    }
    finish(job);
  } catch (err) {
    if (err.status === 401) signedOut(err.message);
    else $("job-error").textContent = err.message;
    $("progress").textContent = "";
    dropPreview();
  } finally {
    stopTicker();
    $("draw").disabled = false;
    $("cancel").hidden = true;
  }
}

function finish(job) {
  if (job.state !== "done") {
    $("progress").textContent = "";
    $("progress").dataset.state = job.state;
    $("job-error").textContent = job.message;
    dropPreview();
    loadHistory();
    return;
  }
  const r = job.result;
  $("result").classList.remove("previewing");
  $("progress").textContent = t("doneIn", { seconds: Math.round(r.elapsed) });
  $("progress").dataset.state = "done";
  showImages($("result-images"), r.images, r.job_id);
  $("result-meta").textContent = `${t("resultMeta", r)} · ${t("jobLine", { id: r.job_id })}`;
  $("result-notes").textContent = [r.spend, ...r.notices].filter(Boolean).join(" · ");
  $("result").hidden = false;
  $("spend").textContent = r.spend;
  loadHistory();
}

function showImages(box, images, jobId) {
  box.replaceChildren(...images.map((image, i) => {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = image.url;
    img.alt = `#${jobId} ${i + 1}`;
    const cap = document.createElement("figcaption");
    const link = document.createElement("a");
    link.href = image.url;
    link.download = `imgbot-${jobId}-${i + 1}.${image.name.split(".").pop()}`;
    link.textContent = t("download");
    link.className = "download";
    cap.append(`${image.width}x${image.height} · `, link);
    fig.append(img, cap);
    return fig;
  }));
}

async function cancelJob() {
  if (!state.job || !state.job.handle) return;
  try {
    await api(`/web/api/jobs/${encodeURIComponent(state.job.handle)}/cancel`, { method: "POST" });
  } catch (err) {
    $("job-error").textContent = err.message;
  }
}

// --- history ----------------------------------------------------------------------------

async function loadHistory() {
  let answer;
  try {
    answer = await api("/web/api/history");
  } catch (err) {
    if (err.status === 401) signedOut(err.message);
    return;
  }
  $("spend").textContent = answer.spend;
  const list = $("history");
  if (!answer.jobs.length) {
    const li = document.createElement("li");
    li.className = "hint";
    li.textContent = t("historyEmpty");
    list.replaceChildren(li);
    return;
  }
  list.replaceChildren(...answer.jobs.map((job) => {
    const li = document.createElement("li");
    li.dataset.job = String(job.id);
    const button = document.createElement("button");
    button.type = "button";
    let thumb;
    if (job.images.length) {
      thumb = document.createElement("img");
      thumb.className = "thumb";
      thumb.src = job.images[0].url;
      thumb.alt = "";
    } else {
      thumb = document.createElement("span");
      thumb.className = "none";
      thumb.textContent = job.status === "succeeded" ? t("notKept") : job.status_text;
    }
    const prompt = document.createElement("span");
    prompt.className = "prompt";
    prompt.textContent = job.prompt;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `#${job.id} · ${job.status_text} · ${job.size} · ${job.quality} · ${job.cost}`;
    button.append(thumb, prompt, meta);
    button.addEventListener("click", () => openJob(job.id));
    li.append(button);
    return li;
  }));
}

async function openJob(id) {
  let job;
  try {
    job = await api(`/web/api/history/${encodeURIComponent(id)}`);
  } catch (err) {
    if (err.status === 401) signedOut(err.message);
    return;
  }
  const when = new Date(job.created_at).toLocaleString(LANG === "zh" ? "zh-CN" : "en");
  $("job-title").textContent = `${t("jobLine", { id: job.id })} · ${job.status_text}`;
  $("job-prompt").textContent = job.prompt;
  $("job-meta").textContent = [when, job.platform, job.size, job.quality, job.model,
    `×${job.n}`, job.cost, job.error].filter(Boolean).join(" · ");
  showImages($("job-images"), job.images, job.id);
  $("job-note").textContent = job.images.length || job.status !== "succeeded" ? "" : t("notKeptLong");
  $("job-dialog").showModal();
}

// --- wiring -----------------------------------------------------------------------------

function wire() {
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const key = $("key-input").value.trim();
    $("key-input").value = "";
    signIn("/web/api/session", { key }, localStorage);
  });
  $("sign-out").addEventListener("click", async () => {
    try { await api("/web/api/session", { method: "DELETE" }); } catch { /* signed out anyway */ }
    signedOut("");
  });
  $("command").addEventListener("input", estimateSoon);
  $("command").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("draw").disabled) draw();
  });
  for (const select of document.querySelectorAll("[data-pick]")) {
    select.addEventListener("change", () => estimate());
  }
  $("ref-input").addEventListener("change", (e) => {
    addFiles([...e.target.files]);
    e.target.value = "";
  });
  const zone = $("refs");
  zone.addEventListener("dragover", (e) => {
    if (dragged !== null) return;
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    zone.classList.remove("over");
    if (dragged !== null || !e.dataTransfer || !e.dataTransfer.files.length) return;
    e.preventDefault();
    addFiles([...e.dataTransfer.files]);
  });
  document.addEventListener("paste", (e) => {
    if (!state.me || $("studio").hidden) return;
    const files = [...(e.clipboardData ? e.clipboardData.items : [])]
      .filter((item) => item.kind === "file")
      .map((item) => item.getAsFile());
    if (!files.length) return; // text pastes into the prompt box as usual
    e.preventDefault();
    addFiles(files);
  });
  $("draw").addEventListener("click", draw);
  $("cancel").addEventListener("click", cancelJob);
  $("history-refresh").addEventListener("click", loadHistory);
  wireMask();
}

start();
