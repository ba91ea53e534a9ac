// imgbot's dashboard for operators: cards, charts drawn here as SVG (no library, nothing
// from outside), tables, and the admin actions. It uses the page's session (signed in on /)
// and calls only /web/api/admin/…, with the session token in the Authorization header.
// Every number comes from the server; every action is the server's admin command.
"use strict";

const TEXTS = {
  en: {
    title: "Dashboard",
    period: "Period", today: "today", days7: "7 days", days30: "30 days", days90: "90 days",
    export: "Export CSV", refresh: "Refresh", backToPage: "Draw",
    signInFirst: "Sign in on the main page first (with your key, the operator's link or the Telegram /web button), then come back.",
    signedOut: "You are not signed in.",
    spentToday: "Spent today", spentMonth: "Spent this month",
    ofLimit: "{percent}% of the global daily limit {limit}",
    noLimit: "no global daily limit",
    monthHint: "since the 1st, UTC",
    jobs: "Jobs",
    jobsHint: "{delivered} delivered · {failed} failed · {cancelled} cancelled · {undelivered} undelivered · {open} open",
    successRate: "Success rate",
    successHint: "delivered / (delivered + failed + undelivered)",
    drawTime: "Draw time (median · p95)",
    drawTimeHint: "from the start of drawing to the charge, jobs drawn",
    balanceErrors: "Upstream balance errors (24 h)",
    balanceHint: "402 / out of balance or quota: top up the upstream account",
    none: "—",
    seconds: "{value} s",
    dailySpend: "Daily spend by model", chartDays: "Days",
    outcomes: "Jobs by outcome",
    kinds: { delivered: "delivered", failed: "failed", cancelled: "cancelled", undelivered: "undelivered", open: "open" },
    misses: "Estimator misses (actual vs reserved)",
    missesSummary: "{count} job(s) where the usage said more than the reservation: {absorbed} credits absorbed; {invalid} with unusable usage.",
    missesNone: "No estimator misses in this period.",
    reservedLegend: "reserved (charged)", reportedLegend: "actual (the usage)",
    tokens: "Tokens: text in, image in, image out",
    textIn: "text in", imageIn: "image in", imageOut: "image out",
    noData: "Nothing in this period.",
    topUsers: "Top users", topUsersHint: "Click a user to see their jobs.",
    topChats: "Top chats",
    user: "User", chat: "Chat", spent: "Spent", when: "When", prompt: "Prompt", size: "Size",
    cost: "Cost", outcome: "Outcome", stage: "Stage", reserved: "Reserved",
    drillTitle: "Jobs of {user} ({days})",
    drillNone: "No jobs in this period.",
    notKept: "not kept",
    close: "Close",
    undelivered: "Undelivered jobs",
    undeliveredHint: "Drawn and charged, but never reached the user (the chat was gone, the platform refused). Refund gives the charge back.",
    unsettled: "Unsettled jobs",
    unsettledHint: "Their cost is unknown (the upstream call broke off); they count at their estimate until refunded.",
    openJobs: "Open reservations",
    openHint: "Jobs queued, drawing or waiting for delivery right now.",
    refund: "Refund", refundSure: "Refund #{id}?",
    nothing: "None.",
    limits: "Limits and blocks",
    defaults: "Defaults: user {user_daily} a day and {user_monthly} a month; chat {chat_daily} a day (0 = unlimited).",
    kindUser: "user", kindChat: "chat",
    daily: "Daily", monthly: "Monthly", blocked: "Blocked",
    saveLimits: "Set limits", block: "Block", unblock: "Unblock", edit: "Edit",
    limitsHelp: "A user or chat as platform:id (telegram:123, discord:456, web:alice). An empty limit goes back to the default; 0 is unlimited.",
    users: "Users", chats: "Chats",
    default: "default", yes: "yes", no: "no",
    keyMissing: "Name a user or chat as platform:id.",
    purchases: "Purchases",
    purchasesHint: "Packs bought with Telegram Stars in this period, and what prepaid jobs of the period spent of the balances.",
    purchaseCount: "Packs bought", purchaseRefunds: "{refunds} refunded",
    starsIn: "Stars in", starsHint: "{refunded} refunded · {net} kept",
    creditsGranted: "Credits granted", creditsHint: "{refunded} taken back by refunds",
    creditsSpent: "Credits spent (prepaid jobs)", spentHint: "{jobs} jobs settled · {held} still held",
    upstreamCost: "Upstream cost of what was spent",
    upstreamHint: "what the upstream's usage said those jobs cost",
    networkError: "The server could not be reached. Check the connection and try again.",
  },
  zh: {
    title: "仪表盘",
    period: "时段", today: "今天", days7: "7 天", days30: "30 天", days90: "90 天",
    export: "导出 CSV", refresh: "刷新", backToPage: "画图",
    signInFirst: "请先在主页登录（用密钥、运营者链接或 Telegram 的 /web 按钮），然后再回来。",
    signedOut: "你尚未登录。",
    spentToday: "今日花费", spentMonth: "本月花费",
    ofLimit: "占全局每日上限 {limit} 的 {percent}%",
    noLimit: "未设全局每日上限",
    monthHint: "自本月 1 日起（UTC）",
    jobs: "任务",
    jobsHint: "{delivered} 已送达 · {failed} 失败 · {cancelled} 已取消 · {undelivered} 未送达 · {open} 进行中",
    successRate: "成功率",
    successHint: "已送达 /（已送达 + 失败 + 未送达）",
    drawTime: "绘制时间（中位数 · p95）",
    drawTimeHint: "从开始绘制到结算，仅统计画成的任务",
    balanceErrors: "上游余额错误（24 小时）",
    balanceHint: "402 / 余额或额度不足：请为上游账户充值",
    none: "—",
    seconds: "{value} 秒",
    dailySpend: "按模型的每日花费", chartDays: "天数",
    outcomes: "任务结果",
    kinds: { delivered: "已送达", failed: "失败", cancelled: "已取消", undelivered: "未送达", open: "进行中" },
    misses: "估算偏差（实际 vs 预留）",
    missesSummary: "{count} 个任务的用量超过预留：共承担 {absorbed} 点数；{invalid} 个用量无法使用。",
    missesNone: "此时段没有估算偏差。",
    reservedLegend: "预留（已扣）", reportedLegend: "实际（用量）",
    tokens: "令牌：文本输入、图像输入、图像输出",
    textIn: "文本输入", imageIn: "图像输入", imageOut: "图像输出",
    noData: "此时段没有数据。",
    topUsers: "花费最多的用户", topUsersHint: "点击用户查看其任务。",
    topChats: "花费最多的群组",
    user: "用户", chat: "群组", spent: "花费", when: "时间", prompt: "提示词", size: "尺寸",
    cost: "费用", outcome: "结果", stage: "阶段", reserved: "预留",
    drillTitle: "{user} 的任务（{days}）",
    drillNone: "此时段没有任务。",
    notKept: "未保留",
    close: "关闭",
    undelivered: "未送达的任务",
    undeliveredHint: "已画好并扣费，但没有送到用户（会话已不存在或平台拒绝）。退款会退回费用。",
    unsettled: "未结算的任务",
    unsettledHint: "费用未知（上游调用中断）；退款前按估算计入。",
    openJobs: "未完成的预留",
    openHint: "正在排队、绘制或等待送达的任务。",
    refund: "退款", refundSure: "确认退款 #{id}？",
    nothing: "无。",
    limits: "上限与封禁",
    defaults: "默认：用户每日 {user_daily}、每月 {user_monthly}；群组每日 {chat_daily}（0 = 不限）。",
    kindUser: "用户", kindChat: "群组",
    daily: "每日", monthly: "每月", blocked: "已封禁",
    saveLimits: "设置上限", block: "封禁", unblock: "解封", edit: "编辑",
    limitsHelp: "用户或群组写作 platform:id（telegram:123、discord:456、web:alice）。上限留空即恢复默认；0 表示不限。",
    users: "用户", chats: "群组",
    default: "默认", yes: "是", no: "否",
    keyMissing: "请以 platform:id 的形式写明用户或群组。",
    purchases: "购买",
    purchasesHint: "此时段内用 Telegram Stars 购买的点数包，以及此时段的预付任务从余额中花掉的点数。",
    purchaseCount: "购买的点数包", purchaseRefunds: "{refunds} 笔已退款",
    starsIn: "收入 Stars", starsHint: "{refunded} 已退款 · {net} 留存",
    creditsGranted: "发放的点数", creditsHint: "退款收回 {refunded}",
    creditsSpent: "花掉的点数（预付任务）", spentHint: "{jobs} 个任务已结算 · {held} 仍在预留",
    upstreamCost: "所花点数的上游成本",
    upstreamHint: "按上游用量计算的这些任务的成本",
    networkError: "无法连接服务器。请检查网络后重试。",
  },
};

const LANG = ((navigator.languages && navigator.languages[0]) || navigator.language || "en")
  .toLowerCase().startsWith("zh") ? "zh" : "en";
const SESSION = "imgbot.session";
const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#3b5bdb", "#f08c00", "#2f9e44", "#ae3ec9", "#1098ad", "#e8590c", "#5c940d", "#c2255c"];
const KIND_COLOURS = { delivered: "#2f9e44", failed: "#e03131", cancelled: "#868e96", undelivered: "#f08c00", open: "#3b5bdb" };
const TOKEN_COLOURS = { text_in: "#1098ad", image_in: "#ae3ec9", image_out: "#3b5bdb" };
const MISS_COLOURS = { reserved: "#868e96", reported: "#e03131" };

const $ = (id) => document.getElementById(id);

function t(key, params = {}) {
  const entry = TEXTS[LANG][key] ?? TEXTS.en[key] ?? key;
  return typeof entry === "string"
    ? entry.replace(/\{(\w+)\}/g, (_, name) => String(params[name] ?? ""))
    : entry;
}

const state = { token: null, data: null, drillUser: null, thumbs: [] };

// --- the server -------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function call(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  let payload;
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, { method, headers, body: payload, cache: "no-store", credentials: "omit" });
  } catch {
    throw new ApiFailure(t("networkError"), 0);
  }
  if (!res.ok) {
    let message = `${res.status} ${res.statusText}`;
    try { message = (await res.json()).error.message || message; } catch { /* not JSON */ }
    throw new ApiFailure(message, res.status);
  }
  return res;
}

const getJson = async (path) => (await call(path)).json();

// --- formatting -------------------------------------------------------------------------

const NUMBER = new Intl.NumberFormat(LANG === "zh" ? "zh-CN" : "en");

function whole(value) { return NUMBER.format(Math.round(value)); }

function compact(value) {
  const abs = Math.abs(value);
  if (abs >= 1e9) return `${+(value / 1e9).toFixed(1)}G`;
  if (abs >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
  if (abs >= 1e3) return `${+(value / 1e3).toFixed(1)}k`;
  return `${+value.toFixed(1)}`;
}

function when(iso) {
  return new Date(iso).toLocaleString(LANG === "zh" ? "zh-CN" : "en", {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
}

function seconds(value) {
  return value === null || value === undefined ? t("none") : t("seconds", { value: value.toFixed(1) });
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svgEl(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

function legend(id, items) {
  const list = $(id);
  list.replaceChildren(...items.map(([label, colour]) => {
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = colour;
    return el("li", {}, swatch, label);
  }));
}

// --- charts (SVG, drawn here) ----------------------------------------------------------------

function niceMax(value) {
  if (value <= 0) return 1;
  const step = 10 ** Math.floor(Math.log10(value));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * step >= value) return m * step;
  return 10 * step;
}

// Stacked bars: one column per label, one segment per series (values[series][column]).
function stackedBars(container, labels, series, { height = 220 } = {}) {
  const width = 900, left = 56, bottom = 24, top = 8;
  const totals = labels.map((_, i) => series.reduce((sum, s) => sum + s.values[i], 0));
  const max = niceMax(Math.max(0, ...totals));
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  const plotH = height - bottom - top, plotW = width - left - 8;
  for (let g = 0; g <= 4; g++) {
    const y = top + plotH - (plotH * g) / 4;
    svg.append(svgEl("line", { x1: left, x2: width - 8, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, compact((max * g) / 4)));
  }
  const slot = plotW / Math.max(1, labels.length);
  const barW = Math.max(2, slot * 0.7);
  const every = Math.ceil(labels.length / 10);
  labels.forEach((label, i) => {
    const x = left + i * slot + (slot - barW) / 2;
    let y = top + plotH;
    for (const s of series) {
      const value = s.values[i];
      if (value <= 0) continue;
      const h = (plotH * value) / max;
      y -= h;
      const rect = svgEl("rect", { x, y, width: barW, height: Math.max(h, 0.5), fill: s.colour,
                                   "data-series": s.name, "data-label": label, "data-value": value });
      rect.append(svgEl("title", {}, `${label} · ${s.name}: ${whole(value)}`));
      svg.append(rect);
    }
    if (i % every === 0) {
      svg.append(svgEl("text", { x: x + barW / 2, y: height - 6, "text-anchor": "middle" }, label.slice(5)));
    }
  });
  container.replaceChildren(svg);
}

function horizontalBars(container, rows) {
  if (!rows.length) {
    container.replaceChildren(el("p", { class: "empty", text: t("noData") }));
    return;
  }
  const width = 560, rowH = 26, left = 170, right = 60;
  const height = rows.length * rowH + 8;
  const max = Math.max(...rows.map((r) => r.value));
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  rows.forEach((row, i) => {
    const y = 4 + i * rowH;
    const w = ((width - left - right) * row.value) / max;
    svg.append(svgEl("text", { x: left - 8, y: y + 16, "text-anchor": "end" }, row.label));
    const rect = svgEl("rect", { x: left, y: y + 3, width: Math.max(w, 1), height: rowH - 8,
                                 fill: row.colour, "data-label": row.label, "data-value": row.value });
    rect.append(svgEl("title", {}, `${row.label}: ${whole(row.value)}`));
    svg.append(rect);
    svg.append(svgEl("text", { x: left + w + 6, y: y + 16 }, whole(row.value)));
  });
  container.replaceChildren(svg);
}

function chartDays(data) {
  // Every UTC day of the chart's window, oldest first, with or without jobs.
  const days = [];
  const end = new Date();
  for (let i = data.chart_days - 1; i >= 0; i--) {
    const d = new Date(Date.UTC(end.getUTCFullYear(), end.getUTCMonth(), end.getUTCDate() - i));
    days.push(d.toISOString().slice(0, 10));
  }
  return days;
}

function drawSpend(data) {
  const days = chartDays(data);
  const models = [...new Set(data.daily.map((r) => r.model))].sort();
  const series = models.map((model, m) => ({
    name: model,
    colour: PALETTE[m % PALETTE.length],
    values: days.map((day) => data.daily.filter((r) => r.day === day && r.model === model)
      .reduce((sum, r) => sum + r.credits, 0)),
  }));
  stackedBars($("chart-spend"), days, series);
  legend("legend-spend", series.map((s) => [s.name, s.colour]));
}

function drawTokens(data) {
  const days = chartDays(data);
  const names = { text_in: t("textIn"), image_in: t("imageIn"), image_out: t("imageOut") };
  const series = Object.keys(names).map((key) => ({
    name: names[key],
    colour: TOKEN_COLOURS[key],
    values: days.map((day) => data.daily.filter((r) => r.day === day).reduce((sum, r) => sum + r[key], 0)),
  }));
  stackedBars($("chart-tokens"), days, series, { height: 180 });
  legend("legend-tokens", series.map((s) => {
    const total = s.values.reduce((a, b) => a + b, 0);
    return [`${s.name} ${compact(total)}`, s.colour];
  }));
}

function drawOutcomes(data) {
  const kinds = t("kinds");
  horizontalBars($("chart-outcomes"), data.outcomes.map((o) => ({
    label: o.code ? `${kinds[o.kind] || o.kind}: ${o.code}` : (kinds[o.kind] || o.kind),
    value: o.jobs,
    colour: KIND_COLOURS[o.kind] || "#868e96",
  })));
}

function drawMisses(data) {
  const over = data.misses.filter((m) => m.reported !== null);
  const invalid = data.misses.length - over.length;
  const absorbed = over.reduce((sum, m) => sum + (m.reported - m.reserved), 0);
  $("misses-summary").textContent = data.misses.length
    ? t("missesSummary", { count: over.length, absorbed: whole(absorbed), invalid })
    : t("missesNone");
  const shown = over.slice(0, 30).reverse();  // oldest of the latest 30 first
  if (!shown.length) {
    $("chart-misses").replaceChildren();
    $("legend-misses").replaceChildren();
    return;
  }
  const labels = shown.map((m) => `#${m.id}`);
  const width = 560, height = 200, left = 56, bottom = 22, top = 8;
  const max = niceMax(Math.max(...shown.map((m) => Math.max(m.reported, m.reserved))));
  const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  const plotH = height - bottom - top, slot = (width - left - 8) / shown.length;
  for (let g = 0; g <= 4; g++) {
    const y = top + plotH - (plotH * g) / 4;
    svg.append(svgEl("line", { x1: left, x2: width - 8, y1: y, y2: y, class: "grid" }));
    svg.append(svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end" }, compact((max * g) / 4)));
  }
  const barW = Math.max(2, slot * 0.35);
  shown.forEach((m, i) => {
    const x = left + i * slot + slot * 0.12;
    for (const [j, key] of ["reserved", "reported"].entries()) {
      const h = (plotH * m[key]) / max;
      const rect = svgEl("rect", { x: x + j * barW, y: top + plotH - h, width: barW, height: Math.max(h, 0.5),
                                   fill: MISS_COLOURS[key], "data-series": key, "data-label": labels[i],
                                   "data-value": m[key] });
      rect.append(svgEl("title", {}, `${labels[i]} ${m.user} · ${t(`${key}Legend`)}: ${whole(m[key])}`));
      svg.append(rect);
    }
    if (shown.length <= 12 || i % Math.ceil(shown.length / 12) === 0) {
      svg.append(svgEl("text", { x: x + barW, y: height - 6, "text-anchor": "middle" }, labels[i]));
    }
  });
  $("chart-misses").replaceChildren(svg);
  legend("legend-misses", [[t("reservedLegend"), MISS_COLOURS.reserved], [t("reportedLegend"), MISS_COLOURS.reported]]);
}

// --- cards and tables ---------------------------------------------------------------------

function card(id, value, hint, alarm = false) {
  const node = $(id);
  node.querySelector(".v").textContent = value;
  if (hint !== undefined) node.querySelector(".h").textContent = hint;
  node.classList.toggle("alarm", alarm);
}

function drawCards(c) {
  const limit = c.global_daily_limit;
  const share = limit > 0 ? c.spent_today / limit : 0;
  card("card-today", c.spent_today_text,
       limit > 0 ? t("ofLimit", { percent: Math.round(share * 100), limit: c.global_daily_limit_text }) : t("noLimit"),
       limit > 0 && share >= 0.8);
  const fill = $("card-today").querySelector(".fill");
  fill.style.width = `${Math.min(100, share * 100)}%`;
  fill.classList.toggle("over", share >= 0.8);
  $("card-today").querySelector(".bar-line").hidden = !(limit > 0);
  card("card-month", c.spent_month_text, t("monthHint"));
  card("card-jobs", whole(c.jobs), t("jobsHint", c));
  card("card-success", c.success_rate === null ? t("none") : `${(c.success_rate * 100).toFixed(1)}%`);
  card("card-time", `${seconds(c.median_s)} · ${seconds(c.p95_s)}`);
  card("card-balance", whole(c.balance_errors_24h), undefined, c.balance_errors_24h > 0);
}

function fill(tableId, rows, build, columns) {
  const body = $(tableId).querySelector("tbody");
  if (!rows.length) {
    body.replaceChildren(el("tr", {}, el("td", { colspan: String(columns), class: "hint", text: t("nothing") })));
    return;
  }
  body.replaceChildren(...rows.map(build));
}

function who(job) {
  return el("td", {}, job.name || job.user, el("span", { class: "sub", text: job.user }));
}

function refundButton(job) {
  const button = el("button", { type: "button", class: "danger", "data-refund": String(job.id), text: t("refund") });
  button.addEventListener("click", async () => {
    // Two steps: the first click arms the button, the second refunds.
    if (!button.classList.contains("armed")) {
      button.classList.add("armed");
      button.textContent = t("refundSure", { id: job.id });
      return;
    }
    button.disabled = true;
    await act("refund", [String(job.id)]);
  });
  return button;
}

function jobRow(job, withRefund) {
  return el("tr", { "data-job": String(job.id) },
    el("td", { text: `#${job.id}` }),
    who(job),
    el("td", { text: when(job.created_at) }),
    el("td", { class: "prompt", text: job.prompt }),
    el("td", { class: "num", text: job.cost }),
    el("td", {}, withRefund && job.refundable ? refundButton(job) : ""));
}

function drawTables(data) {
  fill("top-users", data.top_users, (row) => {
    const tr = el("tr", { class: "pick", tabindex: "0", "data-user": row.user },
      el("td", {}, row.name || row.user, el("span", { class: "sub", text: row.user })),
      el("td", { class: "num", text: row.cost }),
      el("td", { class: "num", text: whole(row.jobs) }));
    tr.addEventListener("click", () => drill(row.user));
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") drill(row.user); });
    return tr;
  }, 3);
  fill("top-chats", data.top_chats, (row) => el("tr", { "data-chat": row.chat },
    el("td", { text: row.chat }), el("td", { class: "num", text: row.cost }),
    el("td", { class: "num", text: whole(row.jobs) })), 3);
  fill("undelivered", data.undelivered, (job) => jobRow(job, true), 6);
  fill("unsettled", data.unsettled, (job) => jobRow(job, true), 6);
  fill("open-jobs", data.open_jobs, (job) => el("tr", { "data-job": String(job.id) },
    el("td", { text: `#${job.id}` }), who(job), el("td", { text: when(job.created_at) }),
    el("td", { text: job.stage }), el("td", { class: "num", text: whole(job.estimated) })), 5);
  const limitText = (value) => (value === null ? t("default") : whole(value));
  fill("user-limits", data.users, (u) => el("tr", { "data-user": u.user },
    el("td", {}, u.name || u.user, el("span", { class: "sub", text: u.user })),
    el("td", { class: "num", text: limitText(u.daily) }),
    el("td", { class: "num", text: limitText(u.monthly) }),
    el("td", { text: u.blocked ? t("yes") : t("no") }),
    el("td", {}, editButton("user", u.user, u.daily, u.monthly))), 5);
  fill("chat-limits", data.chats, (c) => el("tr", { "data-chat": c.chat },
    el("td", { text: c.title ? `${c.title} (${c.chat})` : c.chat }),
    el("td", { class: "num", text: limitText(c.daily) }),
    el("td", { text: c.blocked ? t("yes") : t("no") }),
    el("td", {}, editButton("chat", c.chat, c.daily, null))), 4);
  const d = data.defaults;
  $("limits-defaults").textContent = t("defaults", {
    user_daily: whole(d.user_daily), user_monthly: whole(d.user_monthly), chat_daily: whole(d.chat_daily),
  });
  drawPurchases(data.purchases);
}

function money(value, sign) {
  return `${sign}${value.toLocaleString(LANG === "zh" ? "zh-CN" : "en", { minimumFractionDigits: 2, maximumFractionDigits: 2 })}`;
}

function drawPurchases(p) {
  // Hidden for a limits-mode bot with no purchases in the period (the server sends null).
  $("purchases").hidden = p === null || p === undefined;
  if ($("purchases").hidden) return;
  card("buy-count", whole(p.purchases), t("purchaseRefunds", { refunds: whole(p.refunds) }));
  card("buy-stars", whole(p.stars),
       t("starsHint", { refunded: whole(p.refunded_stars), net: whole(p.stars_net) }));
  card("buy-credits", p.credits_text, t("creditsHint", { refunded: p.refunded_credits_text }));
  card("buy-spent", p.spent_text, t("spentHint", { jobs: whole(p.spent_jobs), held: p.held_text }));
  card("buy-upstream", `${money(p.upstream_cny, "¥")} · ${money(p.upstream_usd, "$")}`);
}

function editButton(kind, key, daily, monthly) {
  const button = el("button", { type: "button", class: "quiet", text: t("edit") });
  button.addEventListener("click", () => {
    $("limit-kind").value = kind;
    $("limit-key").value = key;
    $("limit-daily").value = daily === null ? "" : String(daily);
    $("limit-monthly").value = monthly === null || monthly === undefined ? "" : String(monthly);
    kindChanged();
    $("limit-key").scrollIntoView({ block: "center" });
  });
  return button;
}

// --- the drill-down: one user's jobs, with thumbnails of what is still kept ----------------------

function forgetThumbs() {
  for (const url of state.thumbs) URL.revokeObjectURL(url);
  state.thumbs = [];
}

async function thumb(jobId, index) {
  try {
    const blob = await (await call(`/web/api/admin/jobs/${jobId}/images/${index}`)).blob();
    const url = URL.createObjectURL(blob);
    state.thumbs.push(url);
    return el("img", { src: url, alt: `#${jobId}`, "data-thumb": `${jobId}-${index}` });
  } catch {
    return el("span", { class: "none", text: t("notKept") });
  }
}

async function drill(user) {
  state.drillUser = user;
  const days = $("period").value;
  const answer = await getJson(`/web/api/admin/users/${encodeURIComponent(user)}/jobs?days=${days}`);
  forgetThumbs();
  $("drill").hidden = false;
  $("drill-title").textContent = t("drillTitle", { user, days: $("period").selectedOptions[0].textContent });
  const kinds = t("kinds");
  const rows = await Promise.all(answer.jobs.map(async (job) => {
    const pictures = el("td", { class: "thumbs" });
    if (job.images > 0) {
      for (let i = 0; i < Math.min(job.images, 4); i++) pictures.append(await thumb(job.id, i));
    } else {
      pictures.append(el("span", { class: "none", text: t("notKept") }));
    }
    const outcome = (kinds[job.outcome] || job.outcome) + (job.error ? `: ${job.error}` : "")
      + (job.status === "refunded" ? ` · ${job.status_text}` : "");
    return el("tr", { "data-job": String(job.id) },
      pictures,
      el("td", { text: `#${job.id}` }),
      el("td", { text: when(job.created_at) }),
      el("td", { class: "prompt", text: job.prompt }),
      el("td", { text: `${job.size} · ${job.quality} · ${job.model}` }),
      el("td", { class: "num", text: job.cost }),
      el("td", { text: outcome }));
  }));
  const body = $("drill-jobs").querySelector("tbody");
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: "7", class: "hint", text: t("drillNone") }))]));
  $("drill").scrollIntoView({ block: "start" });
}

// --- actions: the server's admin commands ---------------------------------------------------

async function act(command, args) {
  $("action-error").textContent = "";
  $("action-message").textContent = "";
  try {
    const answer = await (await call("/web/api/admin/action", { method: "POST", body: { command, args } })).json();
    $("action-message").textContent = answer.message;
  } catch (err) {
    $("action-error").textContent = err.message;
  }
  await load();
}

function kindChanged() {
  $("limit-monthly-box").hidden = $("limit-kind").value === "chat";
}

function limitWords() {
  const key = $("limit-key").value.trim();
  if (!key.includes(":")) {
    $("action-error").textContent = t("keyMissing");
    return null;
  }
  const amount = (id) => $(id).value.trim() || "default";
  if ($("limit-kind").value === "chat") return ["chatlimit", [key, `daily=${amount("limit-daily")}`]];
  return ["limit", [key, `daily=${amount("limit-daily")}`, `monthly=${amount("limit-monthly")}`]];
}

// --- CSV export: fetched with the session, saved by the browser ---------------------------------

async function exportCsv() {
  $("action-error").textContent = "";
  try {
    const res = await call(`/web/api/admin/export?days=${$("period").value}`);
    const disposition = res.headers.get("Content-Disposition") || "";
    const name = (disposition.match(/filename="([^"]+)"/) || [])[1] || "imgbot-jobs.csv";
    const url = URL.createObjectURL(await res.blob());
    const link = el("a", { href: url, download: name });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  } catch (err) {
    $("action-error").textContent = err.message;
  }
}

// --- start ----------------------------------------------------------------------------------

function gate(message) {
  $("dash").hidden = true;
  for (const id of ["period-box", "export", "reload"]) $(id).hidden = true;
  $("gate").hidden = false;
  $("gate-message").textContent = message;
}

async function load() {
  const days = $("period").value, chart = $("chart-days").value;
  let data;
  try {
    data = await getJson(`/web/api/admin/overview?days=${days}&chart=${chart}`);
  } catch (err) {
    if (err.status === 401 || err.status === 403) gate(err.message);
    else $("action-error").textContent = err.message;
    return;
  }
  state.data = data;
  $("gate").hidden = true;
  $("dash").hidden = false;
  for (const id of ["period-box", "export", "reload"]) $(id).hidden = false;
  drawCards(data.cards);
  drawSpend(data);
  drawOutcomes(data);
  drawTokens(data);
  drawMisses(data);
  drawTables(data);
  document.body.dataset.loaded = String(Date.now());
  if (state.drillUser && !$("drill").hidden) await drill(state.drillUser);
}

function wire() {
  $("period").addEventListener("change", load);
  $("chart-days").addEventListener("change", load);
  $("reload").addEventListener("click", load);
  $("export").addEventListener("click", exportCsv);
  $("drill-close").addEventListener("click", () => { $("drill").hidden = true; forgetThumbs(); });
  $("limit-kind").addEventListener("change", kindChanged);
  $("limit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const words = limitWords();
    if (words) act(...words);
  });
  for (const [id, command] of [["limit-block", "block"], ["limit-unblock", "unblock"]]) {
    $(id).addEventListener("click", () => {
      const key = $("limit-key").value.trim();
      if (!key.includes(":")) { $("action-error").textContent = t("keyMissing"); return; }
      act(command, [key]);
    });
  }
}

async function start() {
  document.documentElement.lang = LANG === "zh" ? "zh-CN" : "en";
  for (const node of document.querySelectorAll("[data-t]")) node.textContent = t(node.dataset.t);
  wire();
  state.token = sessionStorage.getItem(SESSION) || localStorage.getItem(SESSION);
  if (!state.token) {
    gate(t("signedOut"));
    return;
  }
  try {
    const me = await (await call("/web/api/me")).json();
    $("who").textContent = me.name;
    $("who").title = me.user;
    $("who").hidden = false;
  } catch (err) {
    gate(err.status === 401 ? err.message : t("signedOut"));
    return;
  }
  await load();
}

start();
