/* jsae circuit: an attribution graph (circuit-tracer's graph JSON, from graph-data.js) as SVG.
   Rows are layers (token embeddings at the bottom, logits on top), columns token positions;
   a link's width is |weight| (the strongest drawn widest), blue excites, red inhibits.
   Hover shows a node's label; click pins it (the links among pinned nodes are highlighted) and
   shows it in the panel, with a feature's atlas card; "Group pinned" makes the pinned nodes one
   supernode whose links are the sums of its members'. No network, no library: text is only
   ever set with textContent. State for tests: window.graphView. */
(function () {
  "use strict";
  const SVGNS = "http://www.w3.org/2000/svg";
  const DATA = window.__graph_data;
  const G = DATA.graph;
  const cards = DATA.cards || {};
  const tokens = G.metadata.prompt_tokens;
  const nPos = tokens.length;
  const byId = new Map(G.nodes.map((n) => [n.node_id, n]));
  const MAX_LINKS = 1500;  // links drawn at once (the strongest), besides a pinned node's
  const layers = G.nodes.filter((n) => n.feature_type !== "embedding" && n.feature_type !== "logit")
    .map((n) => +n.layer);
  const logitLayer = G.nodes.filter((n) => n.feature_type === "logit").map((n) => +n.layer);
  const nLayers = Math.max(0, ...layers.map((l) => l + 1), ...logitLayer.map((l) => l - 1));
  const state = { pinned: new Set(), groups: [], clicked: null, nextGroup: 1 };
  const svg = document.getElementById("graph");
  const tip = document.getElementById("tooltip");
  const panel = document.getElementById("panel");

  function el(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function visible(s) {  // whitespace shown (as the atlas shows it); an empty token as ∅
    const v = String(s).replace(/\u2581/g, " ").replace(/\n/g, "⏎").replace(/\t/g, "⇥").replace(/\r/g, "␍");
    return v.trim() ? v : (v.replace(/ /g, "·") || "∅");
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    return a && (a < 1e-3 || a >= 1e5) ? v.toExponential(2) : (+v.toPrecision(3)).toString();
  }
  function row(n) {  // 0: embeddings, 1..L: layers, L + 1: logits
    if (n.feature_type === "embedding") return 0;
    if (n.feature_type === "logit") return nLayers + 1;
    return +n.layer + 1;
  }
  function label(n) {
    if (n.supernode) return `group ${n.name}: ${n.members.length} nodes`;
    if (n.feature_type === "embedding") return `token "${visible(tokens[n.ctx_idx])}" @${n.ctx_idx}`;
    if (n.feature_type === "logit") return visible(n.clerp);
    if (n.feature_type.indexOf("error") >= 0) return `error L${n.layer} @${n.ctx_idx}`;
    const [, f] = n.node_id.split("_");
    return `L${n.layer} #${f} @${n.ctx_idx}` + (n.clerp ? ` ${visible(n.clerp)}` : "");
  }
  function kind(n) {
    if (n.supernode) return "supernode";
    if (n.feature_type === "embedding" || n.feature_type === "logit") return n.feature_type;
    return n.feature_type.indexOf("error") >= 0 ? "error" : "feature";
  }

  // ---- the graph shown: members of a group replaced by the group, links summed
  function shown() {
    const owner = new Map();
    const groups = state.groups.map((g) => {
      const ms = g.members.map((id) => byId.get(id));
      g.members.forEach((id) => owner.set(id, g.id));
      return { node_id: g.id, supernode: true, name: g.name, members: g.members, layer: "",
        ctx_idx: Math.round(ms.reduce((s, m) => s + m.ctx_idx, 0) / ms.length),
        rowf: ms.reduce((s, m) => s + row(m), 0) / ms.length, feature_type: "supernode" };
    });
    const nodes = G.nodes.filter((n) => !owner.has(n.node_id)).concat(groups);
    const sums = new Map();
    for (const l of G.links) {
      const s = owner.get(l.source) || l.source, t = owner.get(l.target) || l.target;
      if (s === t) continue;  // inside a group
      const k = s + "\u0000" + t;
      sums.set(k, (sums.get(k) || 0) + l.weight);
    }
    const links = [];
    for (const [k, w] of sums) {
      const [source, target] = k.split("\u0000");
      links.push({ source, target, weight: w });
    }
    return { nodes, links };
  }

  // ---- layout: column widths follow the most crowded cell of each position
  function layout(nodes) {
    const cells = new Map();
    for (const n of nodes) {
      const r = n.supernode ? Math.round(n.rowf) : row(n);
      const k = r + ":" + n.ctx_idx;
      if (!cells.has(k)) cells.set(k, []);
      cells.get(k).push(n);
    }
    // a logit box is about four nodes wide; a crowded cell widens its column up to 16 nodes
    const need = new Array(nPos).fill(1);
    for (const [k, ns] of cells) {
      const c = +k.split(":")[1];
      const logits = ns.some((n) => kind(n) === "logit");
      need[c] = Math.max(need[c], Math.min(logits ? 4 * ns.length : ns.length, logits ? 40 : 16));
    }
    const left = 64, right = 24, top = 26, bottom = 76;
    const W = Math.max(svg.parentNode.clientWidth - 2, 760);
    const total = need.reduce((a, b) => a + b, 0);
    const colX = [], colW = [];
    let x = left;
    for (let c = 0; c < nPos; c++) {
      colX.push(x);
      colW.push((W - left - right) * need[c] / total);
      x += colW[c];
    }
    const nRows = nLayers + 2;
    const rowH = Math.max(46, Math.min(110, (svg.parentNode.clientHeight - top - bottom) / nRows));
    const H = top + bottom + rowH * nRows;
    const rowY = (r) => top + (nRows - 1 - r + 0.5) * rowH;
    const pos = new Map();
    for (const [k, ns] of cells) {
      const [r, c] = k.split(":").map(Number);
      ns.sort((a, b) => String(a.node_id).localeCompare(String(b.node_id)));
      ns.forEach((n, i) => {
        const y = n.supernode ? rowY(n.rowf) : rowY(r);
        pos.set(n.node_id, { x: colX[c] + colW[c] * (i + 0.5) / ns.length, y });
      });
    }
    return { W, H, pos, rowY, nRows, colX, colW, left, top, rowH };
  }

  function linkPath(a, b) {
    const dy = (b.y - a.y) * 0.5;
    return `M${a.x.toFixed(1)},${a.y.toFixed(1)} C${a.x.toFixed(1)},${(a.y + dy).toFixed(1)} ${b.x.toFixed(1)},${(b.y - dy).toFixed(1)} ${b.x.toFixed(1)},${b.y.toFixed(1)}`;
  }

  function render() {
    const { nodes, links } = shown();
    const L = layout(nodes);
    const nodeOf = new Map(nodes.map((n) => [n.node_id, n]));
    svg.innerHTML = "";
    svg.setAttribute("width", L.W);
    svg.setAttribute("height", L.H);
    svg.setAttribute("viewBox", `0 0 ${L.W} ${L.H}`);
    svg.classList.toggle("haspins", state.pinned.size > 0);
    const grid = el("g", { class: "grid" }, svg);
    for (let r = 0; r < L.nRows; r++) {
      const y = L.rowY(r);
      el("line", { class: "rowline", x1: L.left - 6, x2: L.W - 10, y1: y, y2: y }, grid);
      const t = el("text", { class: "rowlabel", x: 8, y: y + 4 }, grid);
      t.textContent = r === 0 ? "Emb" : r === L.nRows - 1 ? "Logit" : `L${r - 1}`;
    }
    for (let c = 0; c < nPos; c++) {
      const t = el("text", { class: "tok", x: L.colX[c] + L.colW[c] / 2, y: L.H - 18, "text-anchor": "middle" }, grid);
      t.textContent = visible(tokens[c]);
      const title = el("title", {}, t);
      title.textContent = `position ${c}`;
    }
    const maxW = Math.max(1e-12, ...links.map((l) => Math.abs(l.weight)));
    const gl = el("g", { class: "links" }, svg);
    // the MAX_LINKS strongest links (weakest drawn first, under the others), and every link of
    // a pinned node: a real graph keeps thousands, which drawn at once hide each other
    const sorted = links.slice().sort((a, b) => Math.abs(a.weight) - Math.abs(b.weight));
    const cut = sorted.length - MAX_LINKS;
    const order = sorted.filter((l, i) => i >= cut || state.pinned.has(l.source) || state.pinned.has(l.target));
    for (const l of order) {
      const a = L.pos.get(l.source), b = L.pos.get(l.target);
      if (!a || !b) continue;
      const hl = state.pinned.has(l.source) && state.pinned.has(l.target);
      const touch = !hl && (state.pinned.has(l.source) || state.pinned.has(l.target));
      const p = el("path", { d: linkPath(a, b),
        class: `link ${l.weight >= 0 ? "pos" : "neg"}${hl ? " hl" : ""}${touch ? " touch" : ""}`,
        "stroke-width": (0.4 + 6.6 * Math.abs(l.weight) / maxW).toFixed(2),
        "stroke-opacity": (0.1 + 0.75 * Math.sqrt(Math.abs(l.weight) / maxW)).toFixed(3),
        "data-source": l.source, "data-target": l.target, "data-weight": l.weight }, gl);
      p.__link = l;
    }
    const gn = el("g", { class: "nodes" }, svg);
    for (const n of nodes) {
      const p = L.pos.get(n.node_id);
      const k = kind(n);
      const g = el("g", { class: `node ${k}${state.pinned.has(n.node_id) ? " pinned" : ""}`,
        "data-id": n.node_id, transform: `translate(${p.x.toFixed(1)},${p.y.toFixed(1)})` }, gn);
      if (k === "embedding" || k === "logit") {
        const text = k === "logit" ? visible(n.clerp.replace(/^Output "(.*)" \(p=.*\)$/, "$1"))
          : visible(tokens[n.ctx_idx]);
        const w = Math.max(26, Math.min(120, 8 * text.length + 12));
        el("rect", { class: "shape", x: -w / 2, y: -11, width: w, height: 22, rx: 5 }, g);
        const t = el("text", { y: 4, "text-anchor": "middle" }, g);
        t.textContent = text.length > 14 ? text.slice(0, 13) + "…" : text;
      } else if (k === "error") {
        el("rect", { class: "shape", x: -6, y: -6, width: 12, height: 12, rx: 2 }, g);
      } else if (k === "supernode") {
        el("rect", { class: "shape", x: -30, y: -13, width: 60, height: 26, rx: 13 }, g);
        const t = el("text", { y: 4, "text-anchor": "middle" }, g);
        t.textContent = `${n.name} (${n.members.length})`;
      } else {
        el("circle", { class: "shape", r: 8 }, g);
      }
      if (state.pinned.has(n.node_id) && k === "feature") {
        const t = el("text", { class: "nlabel", x: 11, y: -9 }, g);
        const s = label(n);
        t.textContent = s.length > 34 ? s.slice(0, 33) + "…" : s;
      }
      g.addEventListener("mouseenter", (ev) => hover(n, ev, true));
      g.addEventListener("mousemove", (ev) => moveTip(ev));
      g.addEventListener("mouseleave", (ev) => hover(n, ev, false));
      g.addEventListener("click", () => click(n));
    }
    view.shown = { nodes, links };
    updateButtons();
    saveHash();
  }

  // the pins and groups live in the URL (#pins=ID,ID&groups=NAME:ID,ID;NAME:ID,ID), so a view can
  // be bookmarked or sent; ids are escaped with encodeURIComponent
  function saveHash() {
    const enc = (ids) => ids.map(encodeURIComponent).join(",");
    const parts = [];
    if (state.pinned.size) parts.push("pins=" + enc([...state.pinned]));
    if (state.groups.length) {
      parts.push("groups=" + state.groups.map((g) => encodeURIComponent(g.name) + ":" + enc(g.members)).join(";"));
    }
    const h = parts.join("&");
    if (("#" + h) !== (location.hash || "#")) history.replaceState(null, "", h ? "#" + h : location.pathname + location.search);
  }

  function loadHash() {
    const h = location.hash.replace(/^#/, "");
    if (!h) return false;
    const dec = (s) => s.split(",").filter(Boolean).map(decodeURIComponent);
    for (const part of h.split("&")) {
      const [k, v] = [part.slice(0, part.indexOf("=")), part.slice(part.indexOf("=") + 1)];
      if (k === "groups") {
        for (const g of v.split(";").filter(Boolean)) {
          const i = g.indexOf(":");
          const name = decodeURIComponent(g.slice(0, i));
          const ms = dec(g.slice(i + 1)).filter((id) => byId.has(id));
          if (ms.length > 1) state.groups.push({ id: `group:${name}`, name, members: ms });
        }
      }
    }
    const known = new Set([...byId.keys(), ...state.groups.map((g) => g.id)]);
    for (const part of h.split("&")) {
      if (part.startsWith("pins=")) dec(part.slice(5)).filter((id) => known.has(id)).forEach((id) => state.pinned.add(id));
    }
    const n = state.groups.map((g) => +(/^G(\d+)$/.exec(g.name) || [0, 0])[1]);
    state.nextGroup = Math.max(0, ...n) + 1;
    return true;
  }

  function moveTip(ev) {  // beside the pointer, on its left near the right edge
    const box = svg.parentNode.getBoundingClientRect();
    let x = ev.clientX - box.left + 14;
    if (x + tip.offsetWidth > box.width - 8) x = Math.max(4, ev.clientX - box.left - tip.offsetWidth - 14);
    tip.style.left = (x + svg.parentNode.scrollLeft) + "px";
    tip.style.top = (ev.clientY - box.top + svg.parentNode.scrollTop + 12) + "px";
  }

  function hover(n, ev, on) {
    tip.hidden = !on;
    if (on) {
      let s = label(n);
      if (n.activation !== null && n.activation !== undefined) s += ` · act ${fmt(n.activation)}`;
      if (n.influence !== null && n.influence !== undefined) s += ` · influence ${fmt(n.influence)}`;
      tip.textContent = s;
      moveTip(ev);
    }
    svg.querySelectorAll(`.link`).forEach((p) => {
      const l = p.__link;
      if (l && (l.source === n.node_id || l.target === n.node_id)) p.classList.toggle("hover", on);
    });
  }

  function click(n) {
    if (state.pinned.has(n.node_id)) state.pinned.delete(n.node_id);
    else state.pinned.add(n.node_id);
    state.clicked = n.node_id;
    render();
    showPanel(n);
  }

  function kv(k, v) {
    const d = document.createElement("div");
    d.className = "kv";
    d.textContent = k + ": ";
    const b = document.createElement("b");
    b.textContent = v;
    d.appendChild(b);
    return d;
  }

  function showPanel(n) {
    panel.textContent = "";
    const h = document.createElement("h2");
    h.textContent = label(n);
    panel.appendChild(h);
    panel.appendChild(kv("pinned", state.pinned.has(n.node_id) ? "yes" : "no"));
    if (n.supernode) {
      const ul = document.createElement("ul");
      for (const id of n.members) {
        const li = document.createElement("li");
        li.textContent = label(byId.get(id));
        ul.appendChild(li);
      }
      panel.appendChild(ul);
      return;
    }
    panel.appendChild(kv("node", n.node_id));
    if (n.activation !== null && n.activation !== undefined) panel.appendChild(kv("activation", fmt(n.activation)));
    if (n.influence !== null && n.influence !== undefined) panel.appendChild(kv("cumulative influence", fmt(n.influence)));
    if (n.token_prob) panel.appendChild(kv("probability", fmt(n.token_prob)));
    const card = cards[n.node_id];
    if (card) {
      const a = document.createElement("a");
      a.id = "cardlink";
      a.href = card;
      a.target = "_blank";
      a.textContent = "open the atlas card ↗";
      panel.appendChild(a);
      const f = document.createElement("iframe");
      f.id = "card";
      f.title = "atlas card";
      f.src = card;
      panel.appendChild(f);
    } else if (kind(n) === "feature") {
      panel.appendChild(kv("atlas card", "none (no atlas of this layer)"));
    }
  }

  function updateButtons() {
    const ids = [...state.pinned];
    document.getElementById("group").disabled = ids.filter((id) => byId.has(id)).length < 2;
    document.getElementById("ungroup").disabled = !ids.some((id) => id.startsWith("group:"));
    document.getElementById("clear").disabled = ids.length === 0;
  }

  function group() {
    const members = [...state.pinned].filter((id) => byId.has(id));
    if (members.length < 2) return;
    const name = `G${state.nextGroup++}`;
    const id = `group:${name}`;
    state.groups.push({ id, name, members });
    members.forEach((m) => state.pinned.delete(m));
    state.pinned.add(id);
    render();
    showPanel(view.shown.nodes.find((n) => n.node_id === id));
  }

  function ungroup() {
    const gone = new Set([...state.pinned].filter((id) => id.startsWith("group:")));
    for (const g of state.groups) if (gone.has(g.id)) g.members.forEach((m) => state.pinned.add(m));
    state.groups = state.groups.filter((g) => !gone.has(g.id));
    gone.forEach((id) => state.pinned.delete(id));
    render();
  }

  document.getElementById("group").addEventListener("click", group);
  document.getElementById("ungroup").addEventListener("click", ungroup);
  document.getElementById("clear").addEventListener("click", () => { state.pinned.clear(); render(); });
  document.getElementById("prompt").textContent = G.metadata.prompt;
  window.addEventListener("resize", render);
  // the URL's pins and groups, else circuit-tracer's qParams (pinned ids, supernodes [name, ...ids])
  if (!loadHash()) {
    for (const s of G.qParams.supernodes || []) {
      const ms = s.slice(1).filter((id) => byId.has(id));
      if (ms.length > 1) state.groups.push({ id: `group:${s[0]}`, name: String(s[0]), members: ms });
    }
    for (const id of G.qParams.pinnedIds || []) if (byId.has(id)) state.pinned.add(id);
  }

  const view = window.graphView = { state, render, group, ungroup, shown: null, ready: false,
    supernodes: () => state.groups.map((g) => [g.name, ...g.members]) };
  render();
  view.ready = true;
})();
