// A small canvas line chart for telemetry: a time axis, the average as a line, the min/max of
// each rollup bucket as a band, hover values, drag to zoom in and double-click (or Escape) to zoom
// out. The container reserves its height in CSS, so drawing never moves the page.

const PAD = { left: 56, right: 12, top: 10, bottom: 26 };

function niceStep(span, target) {
  const raw = span / Math.max(1, target);
  const mag = 10 ** Math.floor(Math.log10(raw));
  for (const m of [1, 2, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

const TIME_STEPS = [1e3, 5e3, 15e3, 3e4, 6e4, 3e5, 9e5, 18e5, 36e5, 108e5, 216e5, 432e5, 864e5, 1728e5, 6048e5];

function fmtTime(ms, span) {
  const d = new Date(ms);
  const hm = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (span <= 2 * 864e5) return span < 3e5 ? d.toLocaleTimeString() : hm;
  return d.toLocaleDateString([], { month: 'short', day: 'numeric' }) + (span <= 7 * 864e5 ? ' ' + hm : '');
}

export function fmtValue(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e6 || a < 1e-3)) return v.toExponential(2);
  return Number(v.toFixed(a >= 100 ? 1 : 3)).toString();
}

export class LineChart {
  constructor(container, { label = '', onZoom = () => {} } = {}) {
    this.container = container;
    this.onZoom = onZoom;
    this.canvas = document.createElement('canvas');
    this.canvas.setAttribute('role', 'img');
    this.canvas.setAttribute('aria-label', label);
    this.canvas.tabIndex = 0;
    this.tip = document.createElement('div');
    this.tip.className = 'tip';
    this.tip.hidden = true;
    container.append(this.canvas, this.tip);
    this.points = [];
    this.view = null; // [from, to] when zoomed
    this.range = [Date.now() - 9e5, Date.now()];
    this.drag = null;
    this.hover = null;
    this.canvas.addEventListener('pointerdown', e => this.#down(e));
    this.canvas.addEventListener('pointermove', e => this.#move(e));
    this.canvas.addEventListener('pointerup', e => this.#up(e));
    this.canvas.addEventListener('pointerleave', () => { this.hover = null; this.tip.hidden = true; this.draw(); });
    this.canvas.addEventListener('dblclick', () => this.resetZoom());
    this.canvas.addEventListener('keydown', e => { if (e.key === 'Escape') this.resetZoom(); });
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(container);
  }

  destroy() { this.resize.disconnect(); }

  // points: [{t, v, min, max}] sorted by t; range: [from, to] in ms.
  setData(points, range) {
    this.points = points;
    this.range = range;
    this.draw();
  }

  resetZoom() {
    if (!this.view) return;
    this.view = null;
    this.onZoom(null);
    this.draw();
  }

  get domain() { return this.view || this.range; }

  #plot() {
    const w = this.canvas.clientWidth, h = this.canvas.clientHeight;
    return { x0: PAD.left, x1: w - PAD.right, y0: PAD.top, y1: h - PAD.bottom, w, h };
  }

  #xOf(t, p) { const [a, b] = this.domain; return p.x0 + (t - a) / Math.max(1, b - a) * (p.x1 - p.x0); }
  #tOf(x, p) { const [a, b] = this.domain; return a + (x - p.x0) / Math.max(1, p.x1 - p.x0) * (b - a); }

  #down(e) {
    const p = this.#plot();
    if (e.offsetX < p.x0 || e.offsetX > p.x1) return;
    this.drag = { x: e.offsetX, now: e.offsetX };
    this.canvas.setPointerCapture(e.pointerId);
  }

  #move(e) {
    if (this.drag) { this.drag.now = e.offsetX; this.draw(); return; }
    const p = this.#plot();
    const t = this.#tOf(e.offsetX, p);
    const visible = this.#visible();
    if (!visible.length || e.offsetX < p.x0 || e.offsetX > p.x1) { this.hover = null; this.tip.hidden = true; this.draw(); return; }
    let best = visible[0];
    for (const pt of visible) if (Math.abs(pt.t - t) < Math.abs(best.t - t)) best = pt;
    this.hover = best;
    const range = best.min !== undefined && best.min !== best.max ? ` (min ${fmtValue(best.min)}, max ${fmtValue(best.max)})` : '';
    this.tip.textContent = `${new Date(best.t).toLocaleString()}: ${fmtValue(best.v)}${range}`;
    this.tip.hidden = false;
    const x = this.#xOf(best.t, p);
    this.tip.style.left = Math.min(Math.max(0, x + 8), p.w - this.tip.offsetWidth) + 'px';
    this.tip.style.top = '4px';
    this.draw();
  }

  #up(e) {
    if (!this.drag) return;
    const p = this.#plot();
    const [xa, xb] = [Math.min(this.drag.x, e.offsetX), Math.max(this.drag.x, e.offsetX)];
    this.drag = null;
    if (xb - xa >= 6) {
      this.view = [this.#tOf(Math.max(xa, p.x0), p), this.#tOf(Math.min(xb, p.x1), p)];
      this.onZoom(this.view);
    }
    this.draw();
  }

  #visible() {
    const [a, b] = this.domain;
    return this.points.filter(pt => pt.t >= a && pt.t <= b);
  }

  draw() {
    const c = this.canvas, dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth, h = c.clientHeight;
    if (!w || !h) return;
    if (c.width !== Math.round(w * dpr) || c.height !== Math.round(h * dpr)) {
      c.width = Math.round(w * dpr);
      c.height = Math.round(h * dpr);
    }
    const g = c.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const p = this.#plot();
    const pts = this.#visible();
    const style = getComputedStyle(document.documentElement);
    const muted = style.getPropertyValue('--muted') || '#5b6675';
    const line = style.getPropertyValue('--line') || '#d8dde4';
    g.font = '11px system-ui, sans-serif';
    g.fillStyle = muted;
    g.strokeStyle = line;
    g.lineWidth = 1;
    if (!pts.length) {
      g.textAlign = 'center';
      g.fillText('No data in this time range', (p.x0 + p.x1) / 2, (p.y0 + p.y1) / 2);
      return;
    }
    let lo = Infinity, hi = -Infinity;
    for (const pt of pts) {
      lo = Math.min(lo, pt.min ?? pt.v, pt.v);
      hi = Math.max(hi, pt.max ?? pt.v, pt.v);
    }
    if (lo === hi) { lo -= 1; hi += 1; }
    const step = niceStep(hi - lo, 5);
    lo = Math.floor(lo / step) * step;
    hi = Math.ceil(hi / step) * step;
    const yOf = v => p.y1 - (v - lo) / (hi - lo) * (p.y1 - p.y0);
    // Grid and value axis.
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let v = lo; v <= hi + step / 2; v += step) {
      const y = Math.round(yOf(v)) + .5;
      g.beginPath(); g.moveTo(p.x0, y); g.lineTo(p.x1, y); g.stroke();
      g.fillText(fmtValue(v), p.x0 - 6, y);
    }
    // Time axis.
    const [a, b] = this.domain;
    const tstep = TIME_STEPS.find(s => (b - a) / s <= 6) || TIME_STEPS[TIME_STEPS.length - 1];
    g.textAlign = 'center';
    g.textBaseline = 'top';
    const offset = new Date().getTimezoneOffset() * 6e4;
    for (let t = Math.ceil((a - offset) / tstep) * tstep + offset; t <= b; t += tstep) {
      const x = Math.round(this.#xOf(t, p)) + .5;
      g.beginPath(); g.moveTo(x, p.y1); g.lineTo(x, p.y1 + 4); g.stroke();
      g.fillText(fmtTime(t, b - a), x, p.y1 + 7);
    }
    g.save();
    g.beginPath(); g.rect(p.x0, p.y0, p.x1 - p.x0, p.y1 - p.y0); g.clip();
    // Min/max band.
    if (pts.some(pt => pt.min !== undefined)) {
      g.fillStyle = 'rgba(183, 65, 14, .15)';
      g.beginPath();
      pts.forEach((pt, i) => { const x = this.#xOf(pt.t, p), y = yOf(pt.max ?? pt.v); i ? g.lineTo(x, y) : g.moveTo(x, y); });
      for (let i = pts.length - 1; i >= 0; i--) g.lineTo(this.#xOf(pts[i].t, p), yOf(pts[i].min ?? pts[i].v));
      g.closePath(); g.fill();
    }
    g.strokeStyle = '#b7410e';
    g.lineWidth = 1.75;
    g.beginPath();
    pts.forEach((pt, i) => { const x = this.#xOf(pt.t, p), y = yOf(pt.v); i ? g.lineTo(x, y) : g.moveTo(x, y); });
    g.stroke();
    if (pts.length === 1) { g.fillStyle = '#b7410e'; g.beginPath(); g.arc(this.#xOf(pts[0].t, p), yOf(pts[0].v), 3, 0, 7); g.fill(); }
    if (this.hover) {
      const x = this.#xOf(this.hover.t, p);
      g.strokeStyle = muted; g.lineWidth = 1;
      g.beginPath(); g.moveTo(x, p.y0); g.lineTo(x, p.y1); g.stroke();
      g.fillStyle = '#b7410e'; g.beginPath(); g.arc(x, yOf(this.hover.v), 3.5, 0, 7); g.fill();
    }
    if (this.drag) {
      g.fillStyle = 'rgba(26, 95, 180, .15)';
      g.fillRect(Math.min(this.drag.x, this.drag.now), p.y0, Math.abs(this.drag.now - this.drag.x), p.y1 - p.y0);
    }
    g.restore();
  }
}
