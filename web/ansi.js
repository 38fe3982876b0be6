// ANSI SGR colours → styled text segments. Output is data, never markup: the caller makes a
// <span> per segment and sets its textContent, so a log line can never inject HTML.
//
// Supported: 0 reset, 1 bold, 2 dim, 3 italic, 4 underline, 7 inverse, 22–27 their resets,
// 30–37 / 90–97 foreground, 40–47 / 100–107 background, 39 / 49 defaults, and 38/48 with
// ;5;n (256 colours) or ;2;r;g;b (true colour). Every other escape sequence is dropped.

const ESC = "\u001b";

/** The initial (and reset) style. */
function plain() {
  return { fg: null, bg: null, bold: false, dim: false, italic: false, underline: false, inverse: false };
}

/** xterm's 256-colour palette entry n (16–255) as a CSS colour. */
function palette(n) {
  if (n < 16) return null;
  if (n >= 232) {
    const v = 8 + (n - 232) * 10;
    return `rgb(${v}, ${v}, ${v})`;
  }
  const i = n - 16;
  const level = (x) => (x === 0 ? 0 : 55 + x * 40);
  return `rgb(${level(Math.floor(i / 36))}, ${level(Math.floor(i / 6) % 6)}, ${level(i % 6)})`;
}

/** A colour: {cls: "fg-31"} for the 16 basic ones, {css: "rgb(…)"} otherwise. */
function basic(kind, n) {
  // n: 0–7 normal, 8–15 bright
  return { cls: `${kind}-${n < 8 ? 30 + n : 90 + n - 8}` };
}

function extended(kind, params, i) {
  // params[i] is 38 or 48; returns [colour | null, index of the last parameter used]
  const mode = params[i + 1];
  if (mode === 5 && params.length > i + 2) {
    const n = params[i + 2];
    if (n >= 0 && n < 16) return [basic(kind, n), i + 2];
    if (n >= 16 && n <= 255) return [{ css: palette(n) }, i + 2];
    return [null, i + 2];
  }
  if (mode === 2 && params.length > i + 4) {
    const [r, g, b] = params.slice(i + 2, i + 5).map((x) => Math.max(0, Math.min(255, x | 0)));
    return [{ css: `rgb(${r}, ${g}, ${b})` }, i + 4];
  }
  return [null, params.length];
}

function apply(style, params) {
  if (params.length === 0) params = [0];
  for (let i = 0; i < params.length; i++) {
    const p = params[i];
    if (p === 0) Object.assign(style, plain());
    else if (p === 1) style.bold = true;
    else if (p === 2) style.dim = true;
    else if (p === 3) style.italic = true;
    else if (p === 4) style.underline = true;
    else if (p === 7) style.inverse = true;
    else if (p === 22) style.bold = style.dim = false;
    else if (p === 23) style.italic = false;
    else if (p === 24) style.underline = false;
    else if (p === 27) style.inverse = false;
    else if (p >= 30 && p <= 37) style.fg = basic("fg", p - 30);
    else if (p >= 90 && p <= 97) style.fg = basic("fg", p - 90 + 8);
    else if (p === 39) style.fg = null;
    else if (p >= 40 && p <= 47) style.bg = basic("bg", p - 40);
    else if (p >= 100 && p <= 107) style.bg = basic("bg", p - 100 + 8);
    else if (p === 49) style.bg = null;
    else if (p === 38 || p === 48) {
      const [colour, last] = extended(p === 38 ? "fg" : "bg", params, i);
      if (p === 38) style.fg = colour;
      else style.bg = colour;
      i = last;
    }
  }
}

function snapshot(style, text) {
  const classes = [];
  const css = {};
  let { fg, bg } = style;
  if (style.inverse) [fg, bg] = [bg ?? { cls: "bg-default-fg" }, fg ?? { cls: "fg-default-bg" }];
  if (fg?.cls) classes.push(`ansi-${fg.cls}`);
  else if (fg?.css) css.color = fg.css;
  if (bg?.cls) classes.push(`ansi-${bg.cls}`);
  else if (bg?.css) css.backgroundColor = bg.css;
  if (style.bold) classes.push("ansi-bold");
  if (style.dim) classes.push("ansi-dim");
  if (style.italic) classes.push("ansi-italic");
  if (style.underline) classes.push("ansi-underline");
  return { text, classes, css };
}

/**
 * Parses one line. Returns `{segments, style}`: segments are `{text, classes, css}` in order;
 * `style` is the state at the end, to pass as `carry` to the next line (colours may span lines).
 */
export function parseAnsi(line, carry = null) {
  const style = carry ? { ...carry } : plain();
  // A carriage return redraws the line in a terminal: keep what was written last.
  let text = String(line);
  if (text.endsWith("\r")) text = text.slice(0, -1);
  const cr = text.lastIndexOf("\r");
  if (cr >= 0) text = text.slice(cr + 1);

  const segments = [];
  let buf = "";
  const flush = () => {
    if (buf) segments.push(snapshot(style, buf));
    buf = "";
  };
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c !== ESC) {
      // Other C0 controls (bell, backspace …) have no place in a page; tabs stay.
      const code = c.charCodeAt(0);
      if (code < 0x20 && c !== "\t") continue;
      buf += c;
      continue;
    }
    const next = text[i + 1];
    if (next === "[") {
      // CSI: parameters, intermediates, one final byte in 0x40–0x7e.
      let j = i + 2;
      while (j < text.length && !(text.charCodeAt(j) >= 0x40 && text.charCodeAt(j) <= 0x7e)) j++;
      if (j >= text.length) break; // unterminated: drop the rest
      if (text[j] === "m") {
        const raw = text.slice(i + 2, j);
        if (/^[0-9;:]*$/.test(raw)) {
          flush();
          const params = raw === "" ? [] : raw.split(/[;:]/).map((x) => (x === "" ? 0 : parseInt(x, 10)));
          apply(style, params);
        }
      }
      i = j;
    } else if (next === "]") {
      // OSC (titles, hyperlinks): up to BEL or ESC \
      let j = i + 2;
      while (j < text.length && text[j] !== "\u0007" && !(text[j] === ESC && text[j + 1] === "\\")) j++;
      i = text[j] === ESC ? j + 1 : j;
    } else {
      i += 1; // a two-byte escape
    }
  }
  flush();
  return { segments, style };
}
