/* jsae atlas viewer: the map of features (canvas), search, and feature cards.
 *
 * Works from file:// : data files are scripts (data/*.js) that call window.__atlas_*(...),
 * injected on demand. All data text goes through textContent (never innerHTML).
 * Routes: index.html#f=ID opens a card; around-ID.html is the local map around feature ID.
 * A site of several layers (PAGE.layers: [[layer, name], ...]) keeps each layer's data in
 * data/L<layer>/ and shows one at a time: index.html#l=LAYER&f=ID; the selector reloads.
 * Keys: "/" search, ← → previous / next feature.
 * An atlas with families across sizes (jsae atlas --families) shows each card's parent in the
 * next smaller dictionary and children in the next larger (links to their atlases when known);
 * its button colours on the map the features that share the card's parent.
 * window.atlas exposes state for tests: ready, pointsDrawn, nPoints, current, cardReady,
 * screenPos(id), open(id), showFamily(id), familyIds.
 */
(function () {
  "use strict";
  const PAGE = window.ATLAS_PAGE || { kind: "global" };
  const ACT_LEVELS = 1000;
  const atlas = (window.atlas = { ready: false, pointsDrawn: 0, nPoints: 0, current: null, cardReady: false });
  const LAYERS = PAGE.layers || null;
  const hashLayer = () => { const m = /(?:^#|&)l=(\d+)/.exec(location.hash); return m ? Number(m[1]) : null; };
  const LAYER = LAYERS ? (LAYERS.some((l) => l[0] === hashLayer()) ? hashLayer() : LAYERS[0][0]) : null;
  const DATA = LAYERS ? `data/L${LAYER}/` : "data/";
  atlas.layer = LAYER;

  // ------------------------------------------------------------------ data by script tags
  const store = { index: null, shards: {}, tokens: null, local: {} };
  window.__atlas_index = (d) => { store.index = d; };
  window.__atlas_shard = (i, d) => { store.shards[i] = d; };
  window.__atlas_tokens = (d) => { store.tokens = d; };
  window.__atlas_local = (c, d) => { store.local[c] = d; };
  const pending = {};
  function load(src) {
    if (!pending[src]) {
      pending[src] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = src;
        s.async = true;
        s.onload = () => resolve();
        s.onerror = () => { delete pending[src]; reject(new Error("could not load " + src)); };
        document.head.appendChild(s);
      });
    }
    return pending[src];
  }
  const pad4 = (i) => String(i).padStart(4, "0");

  // ------------------------------------------------------------------ small helpers
  function el(tag, props, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v == null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of kids.flat()) {
      if (c == null) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function fmt(v) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    if (a && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    if (a < 100) return String(Number(v.toPrecision(3)));
    return Math.round(v).toLocaleString("en-US");
  }
  function densityText(d) {
    if (!d) return "never fired";
    return `${Number((100 * d).toPrecision(3))}% of tokens (1 in ${Math.round(1 / d).toLocaleString("en-US")})`;
  }
  // Whitespace and control characters made visible (same rule as site.py's visible_token).
  function visible(s, inContext) {
    let out = "";
    for (const ch of String(s).replace(/\u2581/g, " ")) {
      const c = ch.codePointAt(0);
      if (ch === "\n" || ch === "\u2028" || ch === "\u2029") out += "⏎";
      else if (ch === "\u00a0") out += "⍽";
      else if (ch === "\t") out += "⇥";
      else if (ch === "\r") out += "␍";
      else if (c < 32 || c === 127) out += "\\x" + c.toString(16).padStart(2, "0");
      else if (c >= 0xd800 && c <= 0xdfff) out += "\ufffd";
      else out += ch;
    }
    if (!out.trim() && !(inContext && out)) return out.replace(/ /g, "·") || "∅"; // a lone space shows as ·, except in running text
    return out;
  }
  const isWs = (s) => !String(s).replace(/\u2581/g, " ").trim() || /[\n\t\r]/.test(s);
  const shellQuote = (s) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(s) ? s : "'" + s.replace(/'/g, "'\"'\"'") + "'");
  const normalizeToken = (s) => String(s).replace(/\u2581/g, " ").trim().toLowerCase();

  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
    "#ff9da7", "#9c755f", "#3b8bc2", "#8cd17d", "#d37295", "#499894", "#f1ce63", "#a0cbe8", "#86bcb6"];
  const GREY = "#c3c8d0";
  const FAMILY = "#7c3aed"; // a family's features on the map
  const clusterColour = (c) => (c < 0 ? GREY : PALETTE[c % PALETTE.length]);

  // ------------------------------------------------------------------ the map
  class MapView {
    constructor(canvas, pts, onPick) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.pts = pts; // {ids, x, y, cluster, clusters, label(id), center}
      this.onPick = onPick;
      this.n = pts.ids.length;
      this.xs = new Float64Array(this.n);
      this.ys = new Float64Array(this.n);
      this.ok = new Uint8Array(this.n);
      this.rowOf = new Map();
      for (let i = 0; i < this.n; i++) {
        const x = pts.x[i], y = pts.y[i];
        this.rowOf.set(pts.ids[i], i);
        if (x == null || y == null) continue;
        this.xs[i] = x; this.ys[i] = -y; // screen y grows downwards
        this.ok[i] = 1;
      }
      // Draw order: unclustered first, then each cluster in one batch per colour.
      const groups = new Map();
      for (let i = 0; i < this.n; i++) {
        if (!this.ok[i]) continue;
        const col = clusterColour(pts.cluster[i]);
        if (!groups.has(col)) groups.set(col, []);
        groups.get(col).push(i);
      }
      this.groups = [...groups.entries()].sort((a, b) => (a[0] === GREY ? -1 : b[0] === GREY ? 1 : 0));
      this.nOk = this.ok.reduce((a, b) => a + b, 0);
      this.selected = null;
      this.hits = [];
      this.family = [];
      this.links = [];
      this.hover = null;
      this.buildGrid();
      this.bindEvents();
      this.resize();
      new ResizeObserver(() => this.resize()).observe(canvas.parentElement);
    }
    bounds(rows) {
      let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
      for (const i of rows) {
        if (!this.ok[i]) continue;
        x0 = Math.min(x0, this.xs[i]); x1 = Math.max(x1, this.xs[i]);
        y0 = Math.min(y0, this.ys[i]); y1 = Math.max(y1, this.ys[i]);
      }
      if (!isFinite(x0)) return [0, 1, 0, 1];
      return [x0, x1, y0, y1];
    }
    allRows() { const r = []; for (let i = 0; i < this.n; i++) if (this.ok[i]) r.push(i); return r; }
    fit(rows) {
      const [x0, x1, y0, y1] = this.bounds(rows || this.allRows());
      const w = this.w, h = this.h, m = 28;
      const s = Math.min((w - 2 * m) / Math.max(x1 - x0, 1e-9), (h - 2 * m) / Math.max(y1 - y0, 1e-9));
      this.s = Math.min(s, rows ? 400 : Infinity);
      this.tx = w / 2 - this.s * (x0 + x1) / 2;
      this.ty = h / 2 - this.s * (y0 + y1) / 2;
      this.draw();
    }
    resize() {
      const r = this.canvas.parentElement.getBoundingClientRect();
      const dpr = window.devicePixelRatio || 1;
      const first = !this.w;
      const oldW = this.w, oldH = this.h;
      this.w = Math.max(r.width, 10); this.h = Math.max(r.height, 10);
      this.canvas.width = Math.round(this.w * dpr); this.canvas.height = Math.round(this.h * dpr);
      this.canvas.style.width = this.w + "px"; this.canvas.style.height = this.h + "px";
      this.dpr = dpr;
      if (first) this.fit();
      else { this.tx += (this.w - oldW) / 2; this.ty += (this.h - oldH) / 2; this.draw(); }
    }
    buildGrid() {
      const [x0, x1, y0, y1] = this.bounds(this.allRows());
      this.g = { x0, y0, cell: Math.max(x1 - x0, y1 - y0, 1e-9) / 128, cells: new Map() };
      for (let i = 0; i < this.n; i++) {
        if (!this.ok[i]) continue;
        const k = this.cellKey(Math.floor((this.xs[i] - x0) / this.g.cell), Math.floor((this.ys[i] - y0) / this.g.cell));
        let a = this.g.cells.get(k);
        if (!a) this.g.cells.set(k, (a = []));
        a.push(i);
      }
    }
    cellKey(cx, cy) { return (cx + 2048) * 8192 + (cy + 2048); }
    nearest(sx, sy, px) {
      const x = (sx - this.tx) / this.s, y = (sy - this.ty) / this.s, r = px / this.s, g = this.g;
      const cx0 = Math.floor((x - r - g.x0) / g.cell), cx1 = Math.floor((x + r - g.x0) / g.cell);
      const cy0 = Math.floor((y - r - g.y0) / g.cell), cy1 = Math.floor((y + r - g.y0) / g.cell);
      if ((cx1 - cx0 + 1) * (cy1 - cy0 + 1) > 40000) return null;
      let best = null, bd = r * r;
      for (let cx = cx0; cx <= cx1; cx++) {
        for (let cy = cy0; cy <= cy1; cy++) {
          const a = g.cells.get(this.cellKey(cx, cy));
          if (!a) continue;
          for (const i of a) {
            const d = (this.xs[i] - x) ** 2 + (this.ys[i] - y) ** 2;
            if (d <= bd) { bd = d; best = i; }
          }
        }
      }
      return best;
    }
    radius() {
      const base = this.n > 30000 ? 1.6 : this.n > 3000 ? 2.4 : 3.6;
      return Math.min(base * Math.max(1, Math.sqrt(this.s / this.s0())), 9);
    }
    s0() { if (!this._s0) this._s0 = this.s; return this._s0; }
    toScreen(i) { return [this.xs[i] * this.s + this.tx, this.ys[i] * this.s + this.ty]; }
    draw() {
      if (this._raf) return;
      this._raf = requestAnimationFrame(() => { this._raf = 0; this.drawNow(); });
    }
    drawNow() {
      const t0 = performance.now();
      const ctx = this.ctx, w = this.w, h = this.h, r = this.radius();
      ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
      ctx.clearRect(0, 0, w, h);
      let drawn = 0;
      if (this.n > 20000) drawn = this.drawPixels(r);
      else {
        ctx.globalAlpha = 0.85;
        for (const [col, rows] of this.groups) {
          ctx.fillStyle = col;
          ctx.beginPath();
          for (const i of rows) {
            const sx = this.xs[i] * this.s + this.tx, sy = this.ys[i] * this.s + this.ty;
            if (sx < -r || sy < -r || sx > w + r || sy > h + r) continue;
            ctx.moveTo(sx + r, sy); ctx.arc(sx, sy, r, 0, 6.2832);
            drawn++;
          }
          ctx.fill();
        }
      }
      ctx.globalAlpha = 1;
      this.drawLabels();
      const ring = (i, col, rr, lw) => {
        if (i == null || !this.ok[i]) return;
        const [sx, sy] = this.toScreen(i);
        ctx.beginPath(); ctx.arc(sx, sy, rr, 0, 6.2832);
        ctx.lineWidth = lw; ctx.strokeStyle = col; ctx.stroke();
      };
      if (this.selected != null && this.ok[this.selected] && this.links.length) {
        const [x0, y0] = this.toScreen(this.selected);
        ctx.beginPath();
        for (const i of this.links) { const [x1, y1] = this.toScreen(i); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); }
        ctx.lineWidth = 1; ctx.strokeStyle = "rgba(215,38,61,0.45)"; ctx.stroke();
        for (const i of this.links) ring(i, "#d7263d", r + 2, 1.2);
      }
      if (this.family.length) { // a family's features: filled over their colour and the links
        ctx.fillStyle = FAMILY;
        ctx.beginPath();
        for (const i of this.family) {
          if (!this.ok[i]) continue;
          const [sx, sy] = this.toScreen(i);
          ctx.moveTo(sx + r + 2, sy); ctx.arc(sx, sy, r + 2, 0, 6.2832);
        }
        ctx.fill();
      }
      for (const i of this.hits) ring(i, "#111827", r + 3, 1.5);
      if (this.pts.center != null) {
        const c = this.rowOf.get(this.pts.center);
        ring(c, "#111827", r + 6, 2.5);
        if (c != null && this.ok[c]) { // the centre's name beside it, like the paper's figure
          const [sx, sy] = this.toScreen(c), text = `#${this.pts.center} ${this.pts.label(this.pts.center)}`;
          ctx.font = "700 13px system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif";
          ctx.textAlign = "left"; ctx.textBaseline = "middle";
          ctx.lineWidth = 4; ctx.strokeStyle = "rgba(255,255,255,0.95)";
          ctx.strokeText(text, sx + r + 10, sy); ctx.fillStyle = "#111827"; ctx.fillText(text, sx + r + 10, sy);
        }
      }
      ring(this.selected, "#d7263d", r + 5, 2.5);
      ring(this.hover, "#111827", r + 2.5, 1.5);
      atlas.pointsDrawn = drawn;
      atlas.drawMs = performance.now() - t0; // (reported by the tests, never asserted)
    }
    // Many points: squares written straight into an ImageData (no path per point), each colour
    // pre-blended with the background at 70% so overlaps still read as density.
    drawPixels(r) {
      const W = this.canvas.width, H = this.canvas.height, d = this.dpr;
      if (!this._img || this._img.width !== W || this._img.height !== H) {
        this._img = this.ctx.createImageData(W, H);
        this._px = new Uint32Array(this._img.data.buffer);
      }
      const px = this._px, bg = packRGBA(252, 252, 251);
      px.fill(bg);
      const half = Math.max(1, Math.round(r * d)), s = this.s * d, tx = this.tx * d, ty = this.ty * d;
      let drawn = 0;
      for (const [col, rows] of this.groups) {
        const c = blendPacked(col, 0.7);
        for (const i of rows) {
          const cx = Math.round(this.xs[i] * s + tx), cy = Math.round(this.ys[i] * s + ty);
          if (cx < -half || cy < -half || cx >= W + half || cy >= H + half) continue;
          drawn++;
          const x0 = Math.max(cx - half, 0), x1 = Math.min(cx + half, W), y1 = Math.min(cy + half, H);
          for (let y = Math.max(cy - half, 0); y < y1; y++) px.fill(c, y * W + x0, y * W + x1);
        }
      }
      this.ctx.putImageData(this._img, 0, 0);
      return drawn;
    }
    drawLabels() {
      const ctx = this.ctx, placed = [];
      ctx.font = "600 12px system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif";
      ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.lineJoin = "round";
      const zoom = this.s / this.s0();
      const maxLabels = Math.round(14 * Math.max(1, zoom));
      let n = 0;
      for (const [c, label, x, y] of this.pts.clusters || []) {
        if (n >= maxLabels || x == null) break;
        const sx = x * this.s + this.tx, sy = -y * this.s + this.ty;
        if (sx < 0 || sy < 0 || sx > this.w || sy > this.h) continue;
        const text = label.length > 34 ? label.slice(0, 33) + "…" : label;
        const tw = ctx.measureText(text).width + 8, th = 16;
        const box = [sx - tw / 2, sy - th / 2, sx + tw / 2, sy + th / 2];
        if (placed.some((b) => !(box[2] < b[0] || box[0] > b[2] || box[3] < b[1] || box[1] > b[3]))) continue;
        placed.push(box);
        ctx.lineWidth = 4; ctx.strokeStyle = "rgba(255,255,255,0.92)";
        ctx.strokeText(text, sx, sy);
        ctx.fillStyle = c < 0 ? "#4b5563" : shade(clusterColour(c));
        ctx.fillText(text, sx, sy);
        n++;
      }
    }
    bindEvents() {
      const cv = this.canvas;
      let drag = null;
      cv.addEventListener("pointerdown", (e) => {
        drag = { x: e.clientX, y: e.clientY, tx: this.tx, ty: this.ty, moved: false };
        cv.setPointerCapture(e.pointerId);
      });
      cv.addEventListener("pointermove", (e) => {
        const p = this.local(e);
        if (drag) {
          const dx = e.clientX - drag.x, dy = e.clientY - drag.y;
          if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
          if (drag.moved) { this.tx = drag.tx + dx; this.ty = drag.ty + dy; this.draw(); hideTip(); return; }
        }
        const i = this.nearest(p[0], p[1], Math.max(7, this.radius() + 4));
        if (i !== this.hover) { this.hover = i; this.draw(); }
        cv.style.cursor = i == null ? (drag ? "grabbing" : "grab") : "pointer";
        if (i == null) hideTip();
        else showTip(e.clientX, e.clientY, this.pts.ids[i], this.pts.label(this.pts.ids[i]));
      });
      cv.addEventListener("pointerup", (e) => {
        const p = this.local(e);
        if (drag && !drag.moved) {
          const i = this.nearest(p[0], p[1], Math.max(7, this.radius() + 4));
          if (i != null) this.onPick(this.pts.ids[i]);
        }
        drag = null;
      });
      cv.addEventListener("pointerleave", () => { this.hover = null; hideTip(); this.draw(); });
      cv.addEventListener("wheel", (e) => {
        e.preventDefault();
        const [sx, sy] = this.local(e);
        const f = Math.exp(-e.deltaY * (e.deltaMode === 1 ? 0.05 : 0.0015));
        this.zoomAt(sx, sy, f);
      }, { passive: false });
      cv.addEventListener("dblclick", (e) => { const [sx, sy] = this.local(e); this.zoomAt(sx, sy, 2); });
    }
    zoomAt(sx, sy, f) {
      const s = Math.min(Math.max(this.s * f, this.s0() * 0.2), this.s0() * 2000);
      f = s / this.s;
      this.tx = sx - (sx - this.tx) * f; this.ty = sy - (sy - this.ty) * f; this.s = s;
      this.draw();
    }
    local(e) { const b = this.canvas.getBoundingClientRect(); return [e.clientX - b.left, e.clientY - b.top]; }
    centerOn(id) {
      const i = this.rowOf.get(id);
      if (i == null || !this.ok[i]) return false;
      const [sx, sy] = this.toScreen(i);
      if (sx < 40 || sy < 40 || sx > this.w - 40 || sy > this.h - 40) {
        this.tx += this.w / 2 - sx; this.ty += this.h / 2 - sy;
      }
      return true;
    }
    // The selected feature, with lines to its (decoder-cosine) neighbours that are on this map.
    select(id, neighbours) {
      const i = this.rowOf.get(id);
      this.selected = i == null ? null : i;
      this.links = (neighbours || []).map((n) => this.rowOf.get(n)).filter((j) => j != null && this.ok[j]);
      this.draw();
    }
    setFamily(ids) { this.family = ids.map((id) => this.rowOf.get(id)).filter((i) => i != null); this.draw(); }
    setHits(ids) { this.hits = ids.map((id) => this.rowOf.get(id)).filter((i) => i != null); this.draw(); }
    screenPos(id) {
      const i = this.rowOf.get(id);
      if (i == null || !this.ok[i]) return null;
      const b = this.canvas.getBoundingClientRect(), [sx, sy] = this.toScreen(i);
      return { x: b.left + sx, y: b.top + sy };
    }
  }
  const LITTLE = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;
  function packRGBA(r, g, b) {
    return LITTLE ? ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0 : ((r << 24) | (g << 16) | (b << 8) | 255) >>> 0;
  }
  function blendPacked(hex, a) { // a colour at alpha a over the map's background, as one pixel
    const n = parseInt(hex.slice(1), 16), bg = [252, 252, 251];
    const mix = (c, k) => Math.round(a * c + (1 - a) * bg[k]);
    return packRGBA(mix((n >> 16) & 255, 0), mix((n >> 8) & 255, 1), mix(n & 255, 2));
  }
  function shade(hex) { // darker version of a palette colour for label text
    const n = parseInt(hex.slice(1), 16), f = 0.55;
    const r = Math.round(((n >> 16) & 255) * f), g = Math.round(((n >> 8) & 255) * f), b = Math.round((n & 255) * f);
    return `rgb(${r},${g},${b})`;
  }
  const tip = () => document.getElementById("tooltip");
  function showTip(x, y, id, label) {
    const t = tip();
    t.replaceChildren(el("span", { class: "tid", text: "#" + id }), " ", el("span", { text: label }));
    t.hidden = false;
    const b = t.parentElement.getBoundingClientRect();
    t.style.left = Math.min(x - b.left + 14, b.width - t.offsetWidth - 6) + "px";
    t.style.top = Math.max(y - b.top - 30, 4) + "px";
  }
  function hideTip() { const t = tip(); if (t) t.hidden = true; }

  // ------------------------------------------------------------------ cards
  let rowOfId = new Map();
  const labelOf = (id) => { const r = rowOfId.get(id); return r == null ? "" : store.index.labels[r]; };

  async function record(id) {
    const row = rowOfId.get(id);
    if (row == null) return null;
    const shard = Math.floor(row / store.index.shard_size);
    await load(`${DATA}shard-${pad4(shard)}.js`);
    const s = store.shards[shard];
    return { rec: recordAt(s, row - s.lo), tokens: s.tokens };
  }
  // One feature's card record from row j of a shard's columns (site.py's feature_records format):
  // examples [value, anchor, token ids, acts 0..ACT_LEVELS] without padding or empty slots.
  function examples(values, anchors, tokens, qs) {
    const out = [];
    values.forEach((v, k) => {
      if (!(v > 0)) return;
      const toks = tokens[k], q = qs[k], a = Math.min(Math.max(anchors[k], 0), toks.length - 1);
      const keep = [];
      toks.forEach((t, i) => { if (t >= 0) keep.push(i); });
      if (!keep.length) return;
      out.push([v, keep.filter((i) => i < a).length, keep.map((i) => toks[i]), keep.map((i) => q[i])]);
    });
    return out;
  }
  function pairsAt(ids, vals) {
    const keep = ids.map((id, i) => i).filter((i) => ids[i] >= 0);
    return [keep.map((i) => ids[i]), keep.map((i) => vals[i])];
  }
  function recordAt(s, j) {
    const edges = s.band_edges[j];
    return {
      id: s.ids[j], row: s.lo + j, label: s.labels[j], expl: s.expl ? s.expl[j] : null,
      score: s.score ? s.score[j] : null, density: s.density[j], mean: s.mean[j], max: s.max[j],
      cluster: s.cluster[j], hist: s.hist[j],
      top: examples(s.top_value[j], s.top_anchor[j], s.top_tokens[j], s.top_q[j]),
      bands: s.band_count[j].map((count, b) => [edges[b], edges[b + 1], count,
        examples(s.band_value[j][b], s.band_anchor[j][b], s.band_tokens[j][b], s.band_q[j][b])]),
      lt: pairsAt(s.lt_ids[j], s.lt_vals[j]), lb: pairsAt(s.lb_ids[j], s.lb_vals[j]),
      cos: pairsAt(s.cos_ids[j], s.cos_vals[j]), coact: pairsAt(s.coact_ids[j], s.coact_vals[j]),
      profile: s.profile ? s.profile[j] : null,
      family: familyAt(s, j),
    };
  }
  // A card's family links (site.py's _family_record): parent [id (-1: below min_cos), best
  // cosine] in the next smaller dictionary, children [[ids], [cosines]] in the next larger.
  function familyAt(s, j) {
    if (s.fam_parent == null && s.fam_children_ids == null) return null;
    return {
      parent: s.fam_parent != null ? [s.fam_parent[j], s.fam_parent_cos[j]] : null,
      children: s.fam_children_ids != null ? pairsAt(s.fam_children_ids[j], s.fam_children_vals[j]) : null,
    };
  }
  // The features of this atlas that share id's matched parent (id itself when it has none).
  function familyOf(id) {
    const F = store.index.family, r = rowOfId.get(id);
    if (!F || !F.parents || r == null || F.parents[r] < 0) return [id];
    const p = F.parents[r];
    return store.index.ids.filter((x, i) => F.parents[i] === p).sort((a, b) => a - b);
  }
  function showFamily(id) {
    atlas.familyIds = familyOf(id);
    if (atlas.map) atlas.map.setFamily(atlas.familyIds);
    const note = document.querySelector("#panel .famnote");
    if (note) note.textContent = `${atlas.familyIds.length} on the map in violet`;
  }
  atlas.showFamily = showFamily;
  function familyLink(side, id) { // to the sibling dictionary's atlas, else its name and the id
    const text = `${side.name} #${id}`;
    return side.href ? el("a", { class: "famlink", href: `${side.href}#f=${id}`, "data-fid": String(id), text })
      : el("span", { class: "famid", text });
  }
  function familySection(rec) {
    const F = store.index.family, fam = rec.family, rows = [];
    const head = (side, what) => el("span", { class: "k", text: `${what} in ${side.name} (${Number(side.d_sae).toLocaleString("en-US")} features): ` });
    if (fam.parent && F.parent) {
      const [p, c] = fam.parent;
      rows.push(el("div", { class: "famrow parent" }, head(F.parent, "parent"), p >= 0
        ? [familyLink(F.parent, p), el("span", { class: "muted", text: ` cos ${fmt(c)}` })]
        : el("span", { class: "muted", text: `none (best cos ${fmt(c)} < ${fmt(F.min_cos)})` })));
    }
    if (fam.children && F.children) {
      const [ids, cos] = fam.children;
      rows.push(el("div", { class: "famrow children" }, head(F.children, "children"), ids.length
        ? ids.map((id, j) => el("span", { class: "famkid" }, familyLink(F.children, id), el("span", { class: "muted", text: ` cos ${fmt(cos[j])}` })))
        : el("span", { class: "muted", text: "none" })));
    }
    if (PAGE.kind === "global" && atlas.map && F.parents) {
      rows.push(el("div", { class: "famrow" }, el("button", { type: "button", class: "ghost famshow", text: "colour its siblings on the map", onclick: () => showFamily(rec.id) }),
        el("span", { class: "muted famnote" })));
    }
    const sec = section("Family across sizes", ...rows);
    sec.classList.add("family");
    return sec;
  }

  function tokSpan(text, q, anchor, peak) {
    const a = q / ACT_LEVELS;
    if (text === null) return el("span", { class: "tok cont", title: fmt(a * peak) }); // a byte run's tail
    const special = /^<[^<>\s]{1,24}>$/.test(text); // <bos>, <pad>, byte tokens: shown muted
    const s = el("span", { class: "tok" + (anchor ? " anchor" : "") + (isWs(text) || special ? " ws" : ""), title: fmt(a * peak) });
    s.textContent = visible(text, true);
    if (a > 0) s.style.background = `rgba(255,106,0,${a.toFixed(3)})`;
    return s;
  }
  const BYTE = /^<0x([0-9A-Fa-f]{2})>$/;
  // Byte-fallback tokens that together spell characters (<0xC2><0xA0> = U+00A0): the text on the
  // first token of the run, null (an empty span) on the others; runs that do not decode stay raw.
  function mergeBytes(texts) {
    const out = texts.slice();
    for (let i = 0; i < texts.length;) {
      if (!BYTE.test(texts[i])) { i++; continue; }
      let j = i;
      const bytes = [];
      while (j < texts.length && BYTE.test(texts[j])) bytes.push(parseInt(BYTE.exec(texts[j++])[1], 16));
      const s = new TextDecoder("utf-8").decode(new Uint8Array(bytes));
      if (!s.includes("\ufffd")) { out[i] = s; for (let k = i + 1; k < j; k++) out[k] = null; }
      i = j;
    }
    return out;
  }
  function exampleRow(ex, tokens, peak) {
    const [value, anchor, ids, q] = ex;
    const ctx = el("span", { class: "ctx" });
    const texts = mergeBytes(ids.map((t) => tokens[t] ?? `<${t}>`));
    ids.forEach((t, j) => ctx.append(tokSpan(texts[j], q[j], j === anchor, peak)));
    return el("div", { class: "ex" }, el("span", { class: "exv", text: fmt(value) }), ctx);
  }
  const SVG = "http://www.w3.org/2000/svg";
  function svg(tag, attrs, ...kids) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    kids.forEach((c) => e.append(c));
    return e;
  }
  // The bins worth showing: from one before the first non-empty bin to one after the last,
  // widened to at least minBins (site.py's hist_range is the same rule).
  function histRange(counts, minBins = 8) {
    const n = counts.length;
    let a = counts.findIndex((c) => c > 0);
    if (a < 0) return [0, n];
    let b = n - 1 - [...counts].reverse().findIndex((c) => c > 0);
    a = Math.max(0, a - 1); b = Math.min(n, b + 2);
    while (b - a < minBins && (a > 0 || b < n)) {
      if (a > 0) a--;
      if (b - a < minBins && b < n) b++;
    }
    return [a, b];
  }
  function histogram(allCounts, allEdges, mean) {
    const [a, b] = histRange(allCounts), counts = allCounts.slice(a, b), edges = allEdges.slice(a, b + 1);
    const W = 460, H = 96, B = 16, n = counts.length, top = Math.max(1, ...counts), bw = W / Math.max(n, 1);
    const root = svg("svg", { class: "hist", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "activation histogram" });
    counts.forEach((c, i) => {
      const h = (H - B) * c / top;
      const t = svg("title"); t.textContent = `${fmt(edges[i])} to ${fmt(edges[i + 1])}: ${c.toLocaleString("en-US")} tokens`;
      root.append(svg("rect", { x: (i * bw + 0.5).toFixed(1), y: (H - B - h).toFixed(1), width: Math.max(bw - 1, 0.5).toFixed(1), height: h.toFixed(1), fill: "#f08a3c" }, t));
    });
    root.append(svg("line", { x1: 0, x2: W, y1: H - B + 0.5, y2: H - B + 0.5, stroke: "#cbd5e1" }));
    if (mean > 0 && edges[0] > 0 && mean >= edges[0] && mean <= edges[n]) { // bins are log-spaced
      const x = (W * Math.log(mean / edges[0]) / Math.log(edges[n] / edges[0])).toFixed(1);
      root.append(svg("line", { x1: x, x2: x, y1: 2, y2: H - B, stroke: "#374151", "stroke-dasharray": "3 2" }));
      const t = svg("text", { x: Number(x) + 3, y: 10, class: "meanlabel" }); t.textContent = "mean";
      root.append(t);
    }
    for (let i = 0; i <= n; i += Math.max(1, Math.floor(n / 4))) {
      const anchor = i === 0 ? "start" : i === n ? "end" : "middle";
      const t = svg("text", { x: (i * bw).toFixed(1), y: H - 3, "text-anchor": anchor });
      t.textContent = fmt(edges[i]);
      root.append(t);
    }
    return root;
  }
  function pairList(cols, render, cls) {
    const pairs = cols[0].map((id, j) => [id, cols[1][j]]);
    if (!pairs.length) return el("div", { class: "muted", text: "none" });
    const vmax = Math.max(...pairs.map((p) => Math.abs(p[1] || 0)), 1e-12);
    return el("div", { class: "plist" }, pairs.map(([i, v]) => el("div", { class: "pair " + cls },
      render(i), el("span", { class: "pbar", style: `width:${(40 * Math.abs(v || 0) / vmax).toFixed(1)}px` }),
      el("span", { class: "pval", text: fmt(v) }))));
  }
  function featureLink(id) {
    const known = rowOfId.has(id);
    return el(known ? "a" : "span", { class: "pname nb", href: known ? "#f=" + id : null, "data-fid": String(id) },
      el("span", { class: "nbid", text: "#" + id }), " ", labelOf(id) || (known ? "" : "(not in this atlas)"));
  }
  function profileText(profile, hooks) { // a crosscoder feature's share of decoder norm per hook
    return profile.map((v, i) => {
      const h = hooks && hooks[i] ? String(hooks[i]) : `hook ${i}`, m = /blocks\.(\d+)\./.exec(h);
      return `${m ? "L" + m[1] : h} ${Math.round(100 * v)}%`;
    }).join(" · ");
  }
  function profileChart(profile, hooks) { // share of decoder norm per layer written, as bars
    const W = 460, H = 78, B = 14, n = profile.length, bw = W / Math.max(n, 1);
    const root = svg("svg", { class: "hist profile", viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "layer profile" });
    profile.forEach((v, i) => {
      const h = (H - B - 2) * Math.max(0, v || 0), hk = hooks && hooks[i] ? String(hooks[i]) : `hook ${i}`, m = /blocks\.(\d+)\./.exec(hk);
      const name = m ? "L" + m[1] : String(i), t = svg("title");
      t.textContent = `${hk}: ${(100 * (v || 0)).toFixed(1)}% of the decoder norm`;
      root.append(svg("rect", { x: (i * bw + 1).toFixed(1), y: (H - B - h).toFixed(1), width: Math.max(bw - 2, 0.5).toFixed(1), height: h.toFixed(1), fill: "#3b82f6" }, t));
      const lab = svg("text", { x: ((i + 0.5) * bw).toFixed(1), y: H - 3, "text-anchor": "middle" });
      lab.textContent = name;
      root.append(lab);
    });
    root.append(svg("line", { x1: 0, x2: W, y1: H - B + 0.5, y2: H - B + 0.5, stroke: "#cbd5e1" }));
    return root;
  }
  function steerCommand(id) {
    const m = store.index.meta, parts = ["jsae", "steer", String(m.run || "RUN_DIR")];
    if (m.hook) parts.push("--hook", String(m.hook));
    parts.push("--feature", String(id), "--value", "5x");
    if (m.layer_hooks) parts.push("--mode", "add"); // a crosscoder: clamp would be acausal
    parts.push("--prompt", "My favourite place is");
    return parts.map(shellQuote).join(" ");
  }
  function copyButton(text) {
    const b = el("button", { class: "copy", type: "button", text: "copy" });
    b.addEventListener("click", () => {
      const done = () => { b.textContent = "copied"; setTimeout(() => { b.textContent = "copy"; }, 1200); };
      const fallback = () => {
        const ta = el("textarea", { class: "offscreen" }); ta.value = text; document.body.append(ta);
        ta.select(); try { document.execCommand("copy"); done(); } catch (e) { b.textContent = "select and copy"; }
        ta.remove();
      };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, fallback);
      else fallback();
    });
    return b;
  }
  function section(title, ...kids) { return el("section", { class: "sec" }, el("h3", { text: title }), ...kids); }

  function renderCard(rec, tokens) {
    const ix = store.index, peak = rec.max || 0;
    const tokName = (t) => el("span", { class: "pname tokname", text: visible(tokens[t] ?? `<${t}>`) });
    const clusterName = rec.cluster >= 0 ? (ix.clusters.find((c) => c[0] === rec.cluster) || [])[1] : null;
    const head = el("div", { class: "card-head" },
      el("span", { class: "fid", text: "Feature " + rec.id }),
      el("span", { class: "flabel", text: rec.label }));
    const kids = [head];
    if (rec.expl) kids.push(el("p", { class: "expl" }, rec.expl, rec.score != null ? el("span", { class: "muted", text: ` (detection score ${fmt(rec.score)})` }) : null));
    const stats = [["density", densityText(rec.density)], ["mean act", fmt(rec.mean)], ["max act", fmt(rec.max)]];
    if (clusterName) stats.push(["cluster", clusterName]);
    if (rec.profile) stats.push(["writes to", profileText(rec.profile, ix.meta.layer_hooks)]);
    kids.push(el("div", { class: "stats" }, stats.map(([k, v]) => el("div", { class: "stat" }, el("div", { class: "k", text: k }), el("div", { class: "v", text: v })))));
    const tools = el("div", { class: "tools" });
    if (PAGE.kind === "global" && atlas.map && atlas.map.rowOf.has(rec.id) && atlas.map.ok[atlas.map.rowOf.get(rec.id)]) {
      tools.append(el("button", { type: "button", class: "ghost", text: "show on map", onclick: () => { atlas.map.centerOn(rec.id); atlas.map.select(rec.id); } }));
    }
    if (ix.local_maps.some((m) => m[0] === rec.id) && !(PAGE.kind === "local" && PAGE.center === rec.id)) tools.append(el("a", { class: "ghost", href: `around-${rec.id}.html#f=${rec.id}`, text: "map around this feature" }));
    const prev = ix.ids[rec.row - 1], next = ix.ids[rec.row + 1];
    const step = el("span", { class: "step" },
      prev != null ? el("a", { class: "ghost prev", href: "#f=" + prev, text: `← #${prev}` }) : null,
      next != null ? el("a", { class: "ghost next", href: "#f=" + next, text: `#${next} →` }) : null);
    tools.append(step);
    kids.push(tools);
    if (rec.family && store.index.family) kids.push(familySection(rec));
    if (rec.profile) kids.push(section("Layer profile (share of decoder norm per layer written)", profileChart(rec.profile, ix.meta.layer_hooks)));
    kids.push(section("Activation histogram", histogram(rec.hist, ix.hist_edges, rec.mean)));
    kids.push(el("div", { class: "cols" },
      section("Promotes (logit effect)", pairList(rec.lt, tokName, "pos")),
      section("Suppresses", pairList(rec.lb, tokName, "neg"))));
    const top = section("Top activations");
    top.classList.add("top");
    top.append(el("div", { class: "legend muted" }, "token background: activation ÷ the feature's max (",
      fmt(peak), "); ", el("span", { class: "tok anchor", text: "underlined" }), ": the peak token. Hover a token for its value."));
    if (rec.top.length) rec.top.forEach((ex) => top.append(exampleRow(ex, tokens, peak)));
    else top.append(el("div", { class: "muted", text: "no activations in the corpus sample" }));
    kids.push(top);
    const bands = rec.bands.filter((b) => b[3].length);
    if (bands.length) {
      const sec = section("Samples by activation band");
      sec.classList.add("bands");
      for (let b = bands.length - 1; b >= 0; b--) {
        const [lo, hi, count, exs] = bands[b];
        sec.append(el("h4", {}, `${fmt(lo)} – ${fmt(hi)} `, el("span", { class: "muted", text: `(${count.toLocaleString("en-US")} tokens)` })));
        exs.forEach((ex) => sec.append(exampleRow(ex, tokens, peak)));
      }
      kids.push(sec);
    }
    kids.push(el("div", { class: "cols" },
      section("Decoder-cosine neighbours", pairList(rec.cos, featureLink, "nbr cos")),
      section("Co-activation", pairList(rec.coact, featureLink, "nbr coact"))));
    const cmd = steerCommand(rec.id);
    kids.push(section("Steer with it", el("div", { class: "cmdrow" }, el("pre", { class: "cmd", text: cmd }), copyButton(cmd))));
    return kids;
  }

  function renderSummary() {
    const ix = store.index, m = ix.meta, panel = document.getElementById("panel");
    const rows = [["model", m.model], ["hook", m.hook], ["dictionary", m.d_sae != null ? `${Number(m.d_sae).toLocaleString("en-US")} features` : null],
      ["in this atlas", `${ix.n.toLocaleString("en-US")} features`], ["tokens read", m.n_tokens != null ? Number(m.n_tokens).toLocaleString("en-US") : null],
      ["contexts", m.n_contexts != null ? Number(m.n_contexts).toLocaleString("en-US") : null], ["source", m.source],
      ["logit effects", m.logit_method], ["run", m.run], ["created", m.created]].filter((r) => r[1] != null);
    const kids = [el("div", { class: "card-head" }, el("span", { class: "fid", text: "Feature atlas" })),
      el("p", { class: "muted", text: "Click a point on the map or search to open a feature's card." }),
      el("table", { class: "meta" }, rows.map(([k, v]) => el("tr", {}, el("th", { text: k }),
        el("td", { class: String(v).length > 90 ? "long" : null, title: String(v).length > 90 ? String(v) : null, text: String(v) }))))];
    if (ix.local_maps.length) {
      kids.push(section("Neighbourhood maps", el("ul", { class: "locals" }, ix.local_maps.map(([c, r, n]) =>
        el("li", {}, el("a", { href: `around-${c}.html#f=${c}`, "data-fid": String(c) }, `around #${c} `, el("span", { class: "muted", text: `${labelOf(c)} · ${n} features within cosine distance ${Number(r).toFixed(2)}` })))))));
    }
    const clusters = (PAGE.kind === "local" ? store.local[PAGE.center].clusters : ix.clusters).slice(0, 40);
    if (clusters.length && atlas.map) {
      kids.push(section("Clusters", el("ul", { class: "clusters" }, clusters.map(([c, label, , , size]) =>
        el("li", {}, el("span", { class: "swatch", style: `background:${clusterColour(c)}` }),
          el("button", { type: "button", class: "linkish", text: label, onclick: () => zoomCluster(c) }),
          el("span", { class: "muted", text: ` ${size}` }))))));
    }
    panel.replaceChildren(...kids);
  }
  function zoomCluster(c) {
    const map = atlas.map, rows = [];
    for (let i = 0; i < map.n; i++) if (map.pts.cluster[i] === c) rows.push(i);
    map.fit(rows);
  }

  let openSeq = 0;
  async function open(id) {
    const seq = ++openSeq, panel = document.getElementById("panel");
    atlas.current = id; atlas.cardReady = false;
    if (!rowOfId.has(id)) {
      panel.replaceChildren(el("div", { class: "card-head" }, el("span", { class: "fid", text: "Feature " + id })),
        el("p", { class: "warn", text: `Feature ${id} is not in this atlas: it holds ${store.index.n.toLocaleString("en-US")}` +
          (store.index.meta.d_sae ? ` of the dictionary's ${Number(store.index.meta.d_sae).toLocaleString("en-US")} features.` : " features.") }));
      if (atlas.map) atlas.map.select(null);
      atlas.cardReady = true;
      return;
    }
    panel.classList.add("loading");
    let got;
    try { got = await record(id); } catch (e) {
      panel.replaceChildren(el("p", { class: "warn", text: String(e.message || e) }));
      panel.classList.remove("loading");
      return;
    }
    if (seq !== openSeq) return;
    panel.replaceChildren(...renderCard(got.rec, got.tokens));
    panel.classList.remove("loading");
    panel.scrollTop = 0;
    if (atlas.map) { atlas.map.centerOn(id); atlas.map.select(id, got.rec.cos[0]); }
    document.title = `#${id} ${got.rec.label} · jsae atlas`;
    atlas.cardReady = true;
  }
  atlas.open = (id) => { location.hash = "f=" + id; };
  atlas.record = (id) => record(id).then((r) => r && r.rec); // (tests compare it with site.py's)
  function route() {
    if (LAYERS) { // another layer's data: load that page; no layer named: name this one
      const l = hashLayer();
      if (l != null && l !== LAYER && LAYERS.some((x) => x[0] === l)) { location.reload(); return; }
      if (l == null) history.replaceState(null, "", `#l=${LAYER}` + (location.hash.length > 1 ? "&" + location.hash.slice(1) : ""));
    }
    const m = /(?:^#|&)f=(-?\d+)/.exec(location.hash);
    if (m) open(Number(m[1]));
    else { atlas.current = null; renderSummary(); if (atlas.map) atlas.map.select(null); atlas.cardReady = true; }
  }

  // ------------------------------------------------------------------ search
  let lowerLabels = null;
  function searchLabels(q, limit) {
    const words = q.toLowerCase().split(/\s+/).filter(Boolean);
    if (!words.length) return [];
    if (!lowerLabels) lowerLabels = store.index.labels.map((s) => s.toLowerCase());
    const out = [];
    for (let r = 0; r < lowerLabels.length && out.length < limit; r++) {
      if (words.every((w) => lowerLabels[r].includes(w))) out.push(store.index.ids[r]);
    }
    return out;
  }
  // "Which features fire on this text": the query is lower-cased and cut into the index's token
  // strings by greedy longest match (whitespace between tokens skipped, unknown characters
  // dropped); a feature scores the sum over the matched tokens of its weight x ln(1 + n / df).
  function tokenize(q, index) {
    let maxLen = 0;
    for (const k in index) maxLen = Math.max(maxLen, k.length);
    const s = q.replace(/\u2581/g, " ").toLowerCase(), out = [];
    let i = 0;
    while (i < s.length) {
      if (/\s/.test(s[i])) { i++; continue; }
      let hit = null;
      for (let L = Math.min(maxLen, s.length - i); L > 0; L--) {
        const k = s.substr(i, L);
        if (Object.prototype.hasOwnProperty.call(index, k)) { hit = k; break; }
      }
      if (hit) { out.push(hit); i += hit.length; } else i++;
    }
    return out;
  }
  async function searchText(q, limit) {
    await load(DATA + "tokens.js");
    const { index, df, n } = store.tokens, toks = tokenize(q, index), score = new Map(), why = new Map();
    for (const t of toks) {
      const idf = Math.log(1 + n / Math.max(df[t] || 1, 1)); // rare tokens weigh more
      for (const [f, w] of index[t]) {
        score.set(f, (score.get(f) || 0) + w * idf);
        if (!why.has(f)) why.set(f, new Set());
        why.get(f).add(t);
      }
    }
    const ranked = [...score.entries()].sort((a, b) => b[1] - a[1] || a[0] - b[0]).slice(0, limit);
    return { toks, ranked: ranked.map(([f, s]) => [f, s, [...why.get(f)]]) };
  }
  atlas.tokenize = (q) => load(DATA + "tokens.js").then(() => tokenize(q, store.tokens.index));

  function resultItem(id, kind, extra) {
    return el("a", { class: "res " + kind, href: "#f=" + id, "data-fid": String(id) },
      el("span", { class: "nbid", text: "#" + id }), el("span", { class: "rlabel", text: labelOf(id) }),
      extra ? el("span", { class: "muted rextra", text: extra }) : null);
  }
  let searchSeq = 0;
  async function runSearch(q) {
    const seq = ++searchSeq, box = document.getElementById("results");
    q = q.trim();
    atlas.searchReady = false;
    if (!q) { box.hidden = true; if (atlas.map) atlas.map.setHits([]); atlas.searchReady = true; return; }
    const kids = [], hits = [];
    const idm = /^#?(\d+)$/.exec(q);
    if (idm) {
      const id = Number(idm[1]);
      kids.push(el("div", { class: "rhead", text: "Feature id" }));
      if (rowOfId.has(id)) { kids.push(resultItem(id, "byid")); hits.push(id); } else kids.push(el("div", { class: "muted rnone", text: `no feature ${id} in this atlas` }));
    }
    const byLabel = searchLabels(q, 12);
    if (byLabel.length) {
      kids.push(el("div", { class: "rhead", text: "Labels" }), byLabel.map((id) => resultItem(id, "bylabel")));
      hits.push(...byLabel);
    }
    if (!idm) {
      const { toks, ranked } = await searchText(q, 12);
      if (seq !== searchSeq) return;
      kids.push(el("div", { class: "rhead" }, "Fire on this text ",
        el("span", { class: "muted", text: toks.length ? "tokens: " + toks.map((t) => `[${visible(t)}]`).join(" ") : "(no known token in it)" })));
      ranked.forEach(([f, s, why]) => kids.push(resultItem(f, "bytext", `${s.toFixed(2)} · ${why.map(visible).join(", ")}`)));
      hits.push(...ranked.map((r) => r[0]));
    }
    if (seq !== searchSeq) return;
    box.replaceChildren(...kids.flat());
    box.hidden = false;
    if (atlas.map) atlas.map.setHits(hits);
    atlas.searchReady = true;
    atlas.searched = q;
  }
  function bindSearch() {
    const input = document.getElementById("q"), box = document.getElementById("results");
    let timer = 0;
    input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(() => runSearch(input.value), 120); });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        clearTimeout(timer);
        runSearch(input.value).then(() => { const a = box.querySelector("a.res"); if (a) { location.hash = a.getAttribute("href"); box.hidden = true; } });
      } else if (e.key === "Escape") box.hidden = true;
    });
    input.addEventListener("focus", () => { if (box.childNodes.length && input.value.trim()) box.hidden = false; });
    box.addEventListener("click", (e) => { if (e.target.closest("a.res")) box.hidden = true; });
    document.addEventListener("pointerdown", (e) => { if (!e.target.closest(".search")) box.hidden = true; });
    // Keys: "/" focuses the search; ← and → step through features in atlas order.
    document.addEventListener("keydown", (e) => {
      if (e.target.closest && e.target.closest("input, textarea") || e.ctrlKey || e.metaKey || e.altKey) return;
      if (e.key === "/") { e.preventDefault(); input.focus(); input.select(); }
      const a = e.key === "ArrowLeft" ? "a.prev" : e.key === "ArrowRight" ? "a.next" : null;
      const link = a && document.querySelector("#panel " + a);
      if (link) { e.preventDefault(); location.hash = link.getAttribute("href"); }
    });
  }

  // ------------------------------------------------------------------ start
  function layerSelector() { // one page per layer's data: choosing another loads it
    const sel = el("select", { id: "layer", "aria-label": "layer" },
      LAYERS.map(([l, name]) => { const o = el("option", { value: String(l), text: name }); if (l === LAYER) o.selected = true; return o; }));
    sel.addEventListener("change", () => { location.hash = "l=" + sel.value; }); // route() reloads
    document.querySelector(".brand").after(el("label", { class: "layersel" }, "layer ", sel));
  }
  async function start() {
    try {
      await load(DATA + "atlas.js");
    } catch (e) {
      document.getElementById("mapstatus").textContent = "data/atlas.js is missing: write the site with jsae atlas.";
      return;
    }
    const ix = store.index;
    if (LAYERS) layerSelector();
    rowOfId = new Map(ix.ids.map((id, r) => [id, r]));
    const sub = document.getElementById("subtitle");
    const m = ix.meta;
    let pts;
    if (PAGE.kind === "local") {
      await load(`${DATA}around-${PAGE.center}.js`);
      const lm = store.local[PAGE.center];
      pts = { ...lm, label: labelOf };
      sub.replaceChildren(el("a", { href: "index.html", text: "← all features" }), " ",
        el("span", { text: `around #${lm.center} ${labelOf(lm.center)} · ${lm.ids.length} features within cosine distance ${Number(lm.radius).toFixed(2)}` }));
    } else {
      pts = { ids: ix.ids, x: ix.x, y: ix.y, cluster: ix.cluster, clusters: ix.clusters, label: labelOf };
      sub.textContent = [m.model, LAYERS ? m.layer_hook : m.hook, `${ix.n.toLocaleString("en-US")} features`].filter(Boolean).join(" · ");
    }
    atlas.map = new MapView(document.getElementById("map"), pts, (id) => { location.hash = "f=" + id; });
    atlas.nPoints = atlas.map.nOk;
    const off = atlas.map.n - atlas.map.nOk;
    document.getElementById("mapstatus").textContent = `${atlas.map.nOk.toLocaleString("en-US")} features on the map` + (off ? ` (${off.toLocaleString("en-US")} without a position: dead or filtered)` : "");
    atlas.screenPos = (id) => atlas.map.screenPos(id);
    bindSearch();
    window.addEventListener("hashchange", route);
    route();
    requestAnimationFrame(() => requestAnimationFrame(() => { atlas.ready = true; }));
  }
  atlas.normalizeToken = normalizeToken;
  atlas.mergeBytes = mergeBytes; // (tests compare it with site.py's merge_bytes)
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
