// A small line-chart module on <canvas>: time x axis, value y axis with nice ticks, several
// series, an HTML legend, a hover read-out, gaps where a value is null. It sizes itself to its
// container (ResizeObserver) and to the device pixel ratio.
//
// For tests and tools the chart publishes what it draws on its element:
//   data-points = number of non-null points drawn,
//   data-summary = JSON {seriesName: {points, nonzero, max, last}}.

export const PALETTE = ['#1f77d0', '#e8710a', '#2ca02c', '#d62728', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

/** Tick values covering [min, max]: the finest step of 1, 2 or 5 x 10^k giving at most count + 1 intervals. */
export function niceTicks(min, max, count = 4) {
  if (!(max > min)) max = min + 1;
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [0.5, 1, 2, 5, 10].map((m) => m * magnitude).find((s) => (max - min) / s <= count + 1) ?? 10 * magnitude;
  const ticks = [];
  for (let v = Math.floor(min / step) * step; v <= max + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  if (ticks[ticks.length - 1] < max) ticks.push(Number((ticks[ticks.length - 1] + step).toPrecision(12)));
  return ticks;
}

/** Runs of consecutive non-null points: [[[t, v], ...], ...]. */
export function segments(times, values) {
  const runs = [];
  let run = [];
  for (let i = 0; i < times.length; i++) {
    const v = values[i];
    if (v === null || v === undefined || !Number.isFinite(v)) {
      if (run.length) runs.push(run);
      run = [];
    } else {
      run.push([times[i], v]);
    }
  }
  if (run.length) runs.push(run);
  return runs;
}

/** What the chart exposes about each series. */
export function summarize(series) {
  const out = {};
  for (const s of series) {
    const present = s.values.filter((v) => v !== null && v !== undefined && Number.isFinite(v));
    out[s.name] = {
      points: present.length,
      nonzero: present.filter((v) => v !== 0).length,
      max: present.length ? Math.max(...present) : null,
      last: present.length ? present[present.length - 1] : null,
    };
  }
  return out;
}

/** The step between time labels for a span of `spanMs`: about 4-6 labels. */
export function timeStep(spanMs) {
  const steps = [5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600].map((s) => s * 1000);
  return steps.find((s) => spanMs / s <= 6) ?? steps[steps.length - 1];
}

export class LineChart {
  /**
   * title: heading; format(v): y labels and read-out; yMax: a fixed upper bound (e.g. 100 for %)
   * or null to fit the data; testid: the element's data-testid.
   */
  constructor({ title, format = (v) => String(v), yMax = null, testid = null }) {
    this.format = format;
    this.yMax = yMax;
    this.times = [];
    this.series = [];
    this.from = 0;
    this.to = 1;
    this.el = document.createElement('figure');
    this.el.className = 'chart';
    if (testid) this.el.dataset.testid = testid;
    const caption = document.createElement('figcaption');
    caption.textContent = title;
    this.plot = document.createElement('div');
    this.plot.className = 'chart-plot';
    this.canvas = document.createElement('canvas');
    this.canvas.setAttribute('role', 'img');
    this.canvas.setAttribute('aria-label', title);
    this.readout = document.createElement('div');
    this.readout.className = 'chart-readout';
    this.readout.hidden = true;
    this.plot.append(this.canvas, this.readout);
    this.legend = document.createElement('div');
    this.legend.className = 'chart-legend';
    this.el.append(caption, this.plot, this.legend);
    this.hover = null;
    this.canvas.addEventListener('mousemove', (e) => this.onHover(e));
    this.canvas.addEventListener('mouseleave', () => this.onHover(null));
    this.resizer = new ResizeObserver(() => this.render());
    this.resizer.observe(this.plot);
  }

  /** New data: times (unix ms, ascending), series [{name, values, color?}], x window [from, to]. */
  set(times, series, from, to) {
    this.times = times;
    this.series = series.map((s, i) => ({ ...s, color: s.color || PALETTE[i % PALETTE.length] }));
    this.from = from ?? times[0] ?? 0;
    this.to = to ?? times[times.length - 1] ?? 1;
    const summary = summarize(this.series);
    this.el.dataset.summary = JSON.stringify(summary);
    this.el.dataset.points = String(Object.values(summary).reduce((n, s) => n + s.points, 0));
    this.renderLegend(summary);
    this.render();
  }

  renderLegend(summary) {
    this.legend.replaceChildren(
      ...this.series.map((s) => {
        const item = document.createElement('span');
        item.className = 'legend-item';
        const swatch = document.createElement('i');
        swatch.style.background = s.color;
        const last = summary[s.name].last;
        item.append(swatch, `${s.name} `);
        const value = document.createElement('b');
        value.textContent = last === null ? '–' : this.format(last);
        item.append(value);
        return item;
      }),
    );
  }

  /** The y range: from 0 to the data's max (or the fixed bound), never empty. */
  yRange() {
    let max = 0;
    for (const s of this.series) for (const v of s.values) if (Number.isFinite(v) && v > max) max = v;
    if (this.yMax !== null) max = Math.max(max, this.yMax);
    const ticks = niceTicks(0, max > 0 ? max : 1, 4);
    return { min: 0, max: ticks[ticks.length - 1], ticks };
  }

  render() {
    const width = this.plot.clientWidth;
    const height = this.plot.clientHeight;
    if (!width || !height) return;
    const dpr = window.devicePixelRatio || 1;
    if (this.canvas.width !== Math.round(width * dpr) || this.canvas.height !== Math.round(height * dpr)) {
      this.canvas.width = Math.round(width * dpr);
      this.canvas.height = Math.round(height * dpr);
    }
    const ctx = this.canvas.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const style = getComputedStyle(this.el);
    const ink = style.getPropertyValue('--chart-ink').trim() || '#666';
    const grid = style.getPropertyValue('--chart-grid').trim() || '#ddd';
    ctx.font = '11px system-ui, sans-serif';

    const y = this.yRange();
    const labels = y.ticks.map((t) => this.format(t));
    const left = Math.ceil(Math.max(...labels.map((l) => ctx.measureText(l).width))) + 10;
    const box = { left, top: 8, right: width - 10, bottom: height - 20 };
    const span = Math.max(1, this.to - this.from);
    const xOf = (t) => box.left + ((t - this.from) / span) * (box.right - box.left);
    const yOf = (v) => box.bottom - ((v - y.min) / (y.max - y.min)) * (box.bottom - box.top);
    this.geometry = { box, xOf, yOf };

    ctx.lineWidth = 1;
    ctx.fillStyle = ink;
    ctx.strokeStyle = grid;
    ctx.textAlign = 'right';
    ctx.textBaseline = 'middle';
    y.ticks.forEach((t, i) => {
      const py = Math.round(yOf(t)) + 0.5;
      ctx.beginPath();
      ctx.moveTo(box.left, py);
      ctx.lineTo(box.right, py);
      ctx.stroke();
      ctx.fillText(labels[i], box.left - 6, py);
    });
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    const step = timeStep(span);
    for (let t = Math.ceil(this.from / step) * step; t <= this.to; t += step) {
      const px = xOf(t);
      if (px < box.left + 16 || px > box.right - 16) continue;
      ctx.fillText(timeLabel(t, step), px, box.bottom + 5);
    }

    ctx.save();
    ctx.beginPath();
    ctx.rect(box.left, box.top - 2, box.right - box.left, box.bottom - box.top + 4);
    ctx.clip();
    ctx.lineWidth = 1.75;
    ctx.lineJoin = 'round';
    for (const s of this.series) {
      ctx.strokeStyle = s.color;
      ctx.fillStyle = s.color;
      for (const run of segments(this.times, s.values)) {
        if (run.length === 1) {
          ctx.beginPath();
          ctx.arc(xOf(run[0][0]), yOf(run[0][1]), 2, 0, 2 * Math.PI);
          ctx.fill();
          continue;
        }
        ctx.beginPath();
        run.forEach(([t, v], i) => (i ? ctx.lineTo(xOf(t), yOf(v)) : ctx.moveTo(xOf(t), yOf(v))));
        ctx.stroke();
      }
    }
    ctx.restore();
    if (this.hover !== null) this.drawHover(ctx);
  }

  onHover(event) {
    if (!event || !this.geometry || !this.times.length) {
      this.hover = null;
      this.readout.hidden = true;
      this.render();
      return;
    }
    const rect = this.canvas.getBoundingClientRect();
    const x = event.clientX - rect.left;
    let best = 0;
    for (let i = 1; i < this.times.length; i++) {
      if (Math.abs(this.geometry.xOf(this.times[i]) - x) < Math.abs(this.geometry.xOf(this.times[best]) - x)) best = i;
    }
    this.hover = best;
    this.render();
  }

  drawHover(ctx) {
    const i = this.hover;
    const { box, xOf } = this.geometry;
    const px = Math.round(xOf(this.times[i])) + 0.5;
    ctx.strokeStyle = getComputedStyle(this.el).getPropertyValue('--chart-ink').trim() || '#666';
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(px, box.top);
    ctx.lineTo(px, box.bottom);
    ctx.stroke();
    ctx.setLineDash([]);
    const lines = this.series.map((s) => `${s.name}: ${s.values[i] === null || s.values[i] === undefined ? '–' : this.format(s.values[i])}`);
    this.readout.textContent = [timeLabel(this.times[i], 1000), ...lines].join('\n');
    this.readout.hidden = false;
    const onRight = px < box.left + (box.right - box.left) / 2;
    this.readout.style.left = onRight ? `${px + 8}px` : '';
    this.readout.style.right = onRight ? '' : `${this.plot.clientWidth - px + 8}px`;
  }
}

/** HH:MM, or HH:MM:SS when labels are less than a minute apart. */
function timeLabel(unixMs, step) {
  const d = new Date(unixMs);
  const parts = [d.getHours(), d.getMinutes()];
  if (step < 60_000) parts.push(d.getSeconds());
  return parts.map((x) => String(x).padStart(2, '0')).join(':');
}
