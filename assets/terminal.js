// The terminal in the browser, for three pages: an SSH session to a target (a WebSocket to the
// gateway), and a recording in the admin console, replayed or watched while it is made.
// A recording is asciicast v2: a JSON header line, then [seconds, code, text] per event.
// The page streams a live recording into a hidden element as the session goes; this script
// reads what arrived so far, so that no request of its own is needed.
"use strict";

(function () {
  let started = false;

  function status(text) {
    const el = document.getElementById("term-status");
    if (el) el.textContent = text;
  }

  function newTerminal(el, cols, rows) {
    const term = new Terminal({ cols, rows, convertEol: false, scrollback: 5000, fontSize: 14 });
    term.open(el);
    return term;
  }

  // Runs the events of complete lines; returns how many header lines it saw.
  function apply(term, lines, onHeader) {
    for (const line of lines) {
      if (!line) continue;
      let v;
      try {
        v = JSON.parse(line);
      } catch (_) {
        continue;
      }
      if (!Array.isArray(v)) {
        onHeader(v);
        continue;
      }
      if (v[1] === "o") term.write(v[2]);
      else if (v[1] === "r") {
        const m = /^(\d+)x(\d+)$/.exec(v[2]);
        if (m) term.resize(Math.min(+m[1], 500), Math.min(+m[2], 200));
      }
    }
  }

  function sizeOf(header) {
    return [Math.min(header.width || 80, 500), Math.min(header.height || 24, 200)];
  }

  function replay(el, cast) {
    const lines = cast.textContent.split("\n").filter((l) => l);
    if (lines.length === 0) {
      status("The recording is empty.");
      return;
    }
    let header = {};
    try {
      header = JSON.parse(lines[0]);
    } catch (_) {}
    const [cols, rows] = sizeOf(header);
    const term = newTerminal(el, cols, rows);
    window.poortTerminal = term;
    const events = [];
    for (const l of lines.slice(1)) {
      try {
        const v = JSON.parse(l);
        if (Array.isArray(v)) events.push(v);
      } catch (_) {}
    }
    let i = 0;
    let timer = null;
    const done = () => {
      status("End of the recording.");
      document.body.dataset.replayed = "yes";
    };
    const step = () => {
      if (i >= events.length) return done();
      apply(term, [JSON.stringify(events[i])], () => {});
      const gap = i + 1 < events.length ? Math.min(events[i + 1][0] - events[i][0], 1) : 0;
      i++;
      timer = setTimeout(step, Math.max(gap, 0) * 1000);
    };
    const skip = document.getElementById("term-skip");
    if (skip) {
      skip.addEventListener("click", () => {
        clearTimeout(timer);
        while (i < events.length) apply(term, [JSON.stringify(events[i++])], () => {});
        done();
      });
    }
    status("Playing…");
    step();
  }

  function live(el, cast) {
    let term = null;
    let seen = 0;
    let partial = "";
    const tick = () => {
      const text = cast.textContent;
      const fresh = partial + text.slice(seen);
      seen = text.length;
      const lines = fresh.split("\n");
      partial = lines.pop();
      if (!term && lines.length > 0) {
        let header = {};
        try {
          header = JSON.parse(lines[0]);
        } catch (_) {}
        const [cols, rows] = sizeOf(header);
        term = newTerminal(el, cols, rows);
        window.poortTerminal = term;
        lines.shift();
      }
      if (term) apply(term, lines, () => {});
      if (document.readyState === "complete") {
        status("The session ended.");
        document.body.dataset.replayed = "yes";
        return;
      }
      setTimeout(tick, 200);
    };
    status("Live.");
    tick();
  }

  function ssh(el) {
    const cols = 100;
    const rows = 30;
    const term = newTerminal(el, cols, rows);
    window.poortTerminal = term;
    const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + el.dataset.socket;
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    ws.addEventListener("open", () => {
      ws.send(JSON.stringify({ cols, rows }));
      status("Connected.");
      term.focus();
    });
    ws.addEventListener("message", (e) => {
      if (typeof e.data === "string") {
        try {
          const v = JSON.parse(e.data);
          if (v.status) status(v.status);
        } catch (_) {}
        return;
      }
      term.write(new Uint8Array(e.data));
    });
    ws.addEventListener("close", (e) => {
      status(e.reason ? `Disconnected: ${e.reason}` : "Disconnected.");
      document.body.dataset.closed = "yes";
    });
    term.onData((d) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
    });
    term.onResize((s) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ cols: s.cols, rows: s.rows }));
    });
  }

  function start() {
    if (started) return true;
    const el = document.getElementById("term");
    if (!el) return false;
    const mode = el.dataset.mode;
    if (mode === "ssh") {
      started = true;
      ssh(el);
      return true;
    }
    const cast = document.getElementById("cast");
    if (!cast) return false;
    if (mode === "live") {
      started = true;
      live(el, cast);
      return true;
    }
    if (mode === "replay" && document.readyState !== "loading") {
      started = true;
      replay(el, cast);
      return true;
    }
    return false;
  }

  // This script runs from the page's head, before the body is there; a live page's body
  // keeps arriving, so the page never finishes loading while the session lasts.
  const wait = () => {
    if (!start()) setTimeout(wait, 50);
  };
  wait();
})();
