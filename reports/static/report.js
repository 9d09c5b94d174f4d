// The listening report's behaviour: sortable tables, an A/B player per track, W_k plots.
// Written for stem-ensemble (MIT); no dependencies, no network: the page works from file://.
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("report-data").textContent);
  var each = function (root, sel, fn) { Array.prototype.forEach.call(root.querySelectorAll(sel), fn); };

  // ---- sortable tables: click a heading; numbers first click descending, text ascending ----
  function isNum(v) { return v !== "" && isFinite(Number(v)); }
  function sortBy(table, col, th) {
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var values = rows.map(function (r) { return r.cells[col].getAttribute("data-v"); });
    var numeric = values.every(function (v) { return v === "" || isNum(v); });
    var current = th.getAttribute("aria-sort");
    var asc = current ? current === "descending" : !numeric;
    rows.sort(function (a, b) {
      var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
      if (x === "" || y === "") return (x === "") - (y === "");          // missing values last
      var d = numeric ? Number(x) - Number(y) : x.localeCompare(y);
      return asc ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    each(table, "th", function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  }
  each(document, "table.sortable", function (table) {
    each(table, "thead th", function (th, col) {
      th.addEventListener("click", function () { sortBy(table, col, th); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(table, col, th); }
      });
    });
  });

  // ---- one player per track: every clip an <audio>, one of them current --------------------
  var players = [], active = null;
  function clock(s) { s = Math.max(0, s || 0); return Math.floor(s / 60) + ":" + (s % 60).toFixed(1).padStart(4, "0"); }

  function Player(details) {
    this.el = details;
    this.index = Number(details.getAttribute("data-index"));
    this.duration = Number(details.getAttribute("data-duration"));
    this.audios = {};
    this.current = null;
    this.cell = null;
    this.weights = DATA.tracks[this.index].weights;
    var self = this;
    this.button = details.querySelector("button.play");
    this.seek = details.querySelector("input.seek");
    this.time = details.querySelector(".time");
    this.now = details.querySelector(".now");
    this.button.addEventListener("click", function () { self.init(); self.toggle(); });
    this.seek.addEventListener("input", function () {
      self.init();
      self.current.currentTime = Number(self.seek.value);
      self.update();
    });
    each(details, "a.clip", function (a) {
      a.addEventListener("click", function (e) { e.preventDefault(); self.init(); self.select(a, true); });
    });
    each(details, "canvas.lines", function (c) {
      c.addEventListener("click", function (e) {
        self.init();
        self.current.currentTime = self.duration * e.offsetX / c.clientWidth;
        self.update();
      });
    });
    details.addEventListener("toggle", function () {
      if (details.open) { self.init(); self.update(); } else { self.release(); }
    });
  }
  Player.prototype.init = function () {   // audio elements only for tracks someone opens
    if (this.current) return;
    var self = this, box = document.createElement("div");
    box.className = "audios";
    box.hidden = true;
    each(this.el, "a.clip", function (a) {
      var href = a.getAttribute("href");
      if (self.audios[href]) return;
      var au = document.createElement("audio");
      au.preload = "auto";
      au.src = href;
      au.addEventListener("ended", function () { self.update(); });
      au.addEventListener("pause", function () { self.update(); });
      au.addEventListener("play", function () { self.update(); self.loop(); });
      box.appendChild(au);
      self.audios[href] = au;
    });
    this.el.appendChild(box);
    this.select(this.el.querySelector("a.clip"), false);
  };
  Player.prototype.release = function () {   // a closed track frees its media players
    var self = this;
    Object.keys(this.audios).forEach(function (href) {
      var au = self.audios[href];
      au.pause();
      au.removeAttribute("src");
      au.load();
    });
    each(this.el, "div.audios", function (box) { box.remove(); });
    if (this.cell) this.cell.classList.remove("active");
    this.audios = {};
    this.current = this.cell = null;
    if (active === this) active = null;
  };
  Player.prototype.select = function (a, play) {
    var au = this.audios[a.getAttribute("href")], prev = this.current;
    active = this;
    if (a === this.cell && play) { this.toggle(); return; }
    var playing = prev && !prev.paused;
    if (prev && prev !== au) {
      au.currentTime = prev.currentTime;   // the A/B switch: same position, same state
      prev.pause();
    }
    this.current = au;
    if (this.cell) this.cell.classList.remove("active");
    this.cell = a;
    a.classList.add("active");
    this.now.textContent = a.getAttribute("data-label");
    if (playing || play) this.play(); else this.update();
  };
  Player.prototype.play = function () {
    players.forEach(function (p) { if (p !== this && p.current) p.current.pause(); }, this);
    active = this;
    var self = this, promise = this.current.play();
    if (promise) promise.catch(function () { self.update(); });   // e.g. blocked autoplay
  };
  Player.prototype.toggle = function () { if (this.current.paused) this.play(); else this.current.pause(); };
  Player.prototype.loop = function () {
    var self = this;
    if (!this.current || this.current.paused) return;
    this.update();
    window.requestAnimationFrame(function () { self.loop(); });
  };
  Player.prototype.update = function () {
    var t = this.current ? this.current.currentTime : 0, playing = this.current && !this.current.paused;
    this.button.textContent = playing ? "❚❚" : "▶";
    this.button.setAttribute("aria-label", playing ? "pause" : "play");
    this.seek.value = t;
    this.time.textContent = clock(t) + " / " + clock(this.duration);
    var self = this;
    each(this.el, "figure.weights", function (fig) {
      var w = self.weights[Number(fig.getAttribute("data-w"))];
      drawLines(fig.querySelector("canvas.lines"), w, self.duration, t);
      drawMatrix(fig.querySelector("canvas.matrix"), w, t);
    });
  };

  // ---- mixing weights W_k over the excerpt ----------------------------------------------------
  var COLORS = ["#777777", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"];
  function sized(canvas, w, h) {
    var dpr = window.devicePixelRatio || 1, ctx = canvas.getContext("2d");
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    canvas.style.height = h + "px";
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.font = "11px sans-serif";
    return ctx;
  }
  function drawLines(canvas, w, duration, t) {   // w.lines: [[target, [[input, values]...]]...]
    var width = canvas.clientWidth, strip = 84, n = w.lines.length;
    if (!width || !w.starts.length) return;
    var ctx = sized(canvas, width, strip * n + 18), lo = Infinity, hi = -Infinity;
    w.lines.forEach(function (target) {
      target[1].forEach(function (line) {
        line[1].forEach(function (v) { lo = Math.min(lo, v); hi = Math.max(hi, v); });
      });
    });
    var pad = Math.max(0.02, 0.08 * (hi - lo));   // the data's own range: small changes stay visible
    lo -= pad; hi += pad;
    var x = function (sec) { return Math.max(0, Math.min(width, width * sec / duration)); };
    w.lines.forEach(function (target, r) {
      var top = 18 + r * strip, y = function (v) { return top + 4 + (strip - 10) * (hi - v) / (hi - lo); };
      ctx.strokeStyle = "#ccc";
      ctx.strokeRect(0.5, top + 0.5, width - 1, strip - 4);
      if (lo < 0 && hi > 0) { ctx.beginPath(); ctx.moveTo(0, y(0)); ctx.lineTo(width, y(0)); ctx.stroke(); }
      ctx.fillStyle = "#333";
      ctx.fillText(target[0], 5, top + 13);
      target[1].forEach(function (line, j) {
        ctx.strokeStyle = COLORS[j % COLORS.length];
        ctx.beginPath();
        line[1].forEach(function (v, i) {
          var a = x(w.starts[i]), b = x(w.starts[i] + w.segment);
          if (i === 0) ctx.moveTo(a, y(v)); else ctx.lineTo(a, y(v));
          ctx.lineTo(b, y(v));
        });
        ctx.stroke();
      });
    });
    var pos = 4;   // legend on top: the inputs of the first target (the same for all, or a subset)
    w.lines[0][1].forEach(function (line, j) {
      ctx.fillStyle = COLORS[j % COLORS.length];
      ctx.fillRect(pos, 6, 10, 3);
      ctx.fillStyle = "#333";
      ctx.fillText(line[0], pos + 14, 11);
      pos += 24 + ctx.measureText(line[0]).width;
    });
    ctx.fillText("each strip from " + lo.toFixed(2) + " to " + hi.toFixed(2), pos + 10, 11);
    ctx.strokeStyle = "#d00";
    ctx.beginPath(); ctx.moveTo(x(t), 14); ctx.lineTo(x(t), 18 + strip * n); ctx.stroke();
  }
  function drawMatrix(canvas, w, t) {
    if (!w.W.length) return;
    var k = 0;
    w.starts.forEach(function (s, i) { if (s <= t) k = i; });
    if (w.lim === undefined) {
      w.lim = 1e-9;
      w.W.forEach(function (m) { m.forEach(function (row) { row.forEach(function (v) { w.lim = Math.max(w.lim, Math.abs(v)); }); }); });
    }
    var cell = 13, left = 0, top = 0, probe = sized(canvas, 10, 10);
    var caption = "W_k at " + clock(w.starts[k]) + " (red > 0, blue < 0, max |w| " + w.lim.toFixed(2) + ")";
    w.inputs.forEach(function (n) { left = Math.max(left, probe.measureText(n).width); });
    w.outputs.forEach(function (n) { top = Math.max(top, probe.measureText(n).width); });
    left += 8; top += 8;
    var width = Math.max(left + cell * w.outputs.length + 2, probe.measureText(caption).width + 4);
    var ctx = sized(canvas, width, top + cell * w.inputs.length + 16);
    canvas.style.width = width + "px";
    w.W[k].forEach(function (row, i) {
      row.forEach(function (v, j) {
        var a = Math.max(-1, Math.min(1, v / w.lim)), c = Math.round(255 * (1 - Math.abs(a)));
        ctx.fillStyle = a >= 0 ? "rgb(255," + c + "," + c + ")" : "rgb(" + c + "," + c + ",255)";
        ctx.fillRect(left + j * cell, top + i * cell, cell - 1, cell - 1);
      });
    });
    ctx.fillStyle = "#333";
    w.inputs.forEach(function (n, i) { ctx.fillText(n, 2, top + i * cell + 10); });
    w.outputs.forEach(function (n, j) {
      ctx.save(); ctx.translate(left + j * cell + 10, top - 4); ctx.rotate(-Math.PI / 2);
      ctx.fillText(n, 0, 0); ctx.restore();
    });
    ctx.fillText(caption, 2, top + cell * w.inputs.length + 12);
  }

  each(document, "details.track", function (d) { players.push(new Player(d)); });
  players.forEach(function (p) { if (p.el.open) { p.init(); p.update(); } });
  document.addEventListener("keydown", function (e) {
    var tag = (e.target.tagName || "").toLowerCase();
    if (e.key !== " " || ["input", "button", "a", "textarea", "select", "summary", "th"].indexOf(tag) >= 0) return;
    var p = active || players.filter(function (q) { return q.el.open; })[0];
    if (p) { e.preventDefault(); p.init(); p.toggle(); }
  });
  window.reportPlayers = players;   // for tests and the console
})();
