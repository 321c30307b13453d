"""The HTML page's style sheet and script, inline in the page (it opens from disk with no network): a few rules for
a laptop screen and for print, table sorting by a header click, and the per-class search; and the one escaping
function every name from an experiment goes through."""

from __future__ import annotations

import html


def esc(value: object) -> str:
    """Text or attribute value, HTML-escaped (``<``, ``>``, ``&`` and both quotes)."""
    return html.escape(str(value), quote=True)


CSS = """
:root { --fg: #1d232b; --muted: #5e6875; --line: #d9dee5; --up: #dff3e4; --down: #fbe1df; --accent: #2f5f9e; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0;
       background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 18px 24px 40px; background: #fff; }
header h1 { font-size: 22px; margin: 0 0 2px; }
header p { margin: 0; color: var(--muted); }
nav { position: sticky; top: 0; background: #fff; padding: 8px 0; border-bottom: 1px solid var(--line);
      margin-bottom: 8px; z-index: 1; }
nav a { margin-right: 16px; color: var(--accent); text-decoration: none; font-weight: 600; }
h2 { font-size: 18px; margin: 26px 0 8px; border-bottom: 2px solid var(--line); padding-bottom: 3px; }
h3 { font-size: 15px; margin: 18px 0 6px; }
p.note { color: var(--muted); margin: 4px 0 10px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
code { font: 12px ui-monospace, SFMono-Regular, Menlo, monospace; }
.grid2 { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 4px 24px; }
table { border-collapse: collapse; margin: 4px 0 10px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 7px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
td.cell, td:first-child { white-space: nowrap; }
.grid2 table { font-size: 12.5px; }
.grid2 th, .grid2 td { padding: 3px 5px; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; }
thead th { background: #eef1f5; font-weight: 600; white-space: nowrap; }
table.sortable thead th { cursor: pointer; user-select: none; }
table.sortable thead th[data-dir="asc"]::after { content: " \\25B2"; font-size: 10px; }
table.sortable thead th[data-dir="desc"]::after { content: " \\25BC"; font-size: 10px; }
td .s { color: var(--muted); font-size: 11px; }
td .pub { display: block; color: var(--muted); font-size: 11px; }
td .runs { display: block; font-size: 10px; }
td .runs a { color: var(--accent); margin-right: 3px; }
td.neg { background: var(--down); }
td.up { background: var(--up); }
td.down { background: var(--down); }
td.missing { color: #9aa3ad; }
tr.mid.folded { display: none; }
.figure svg { max-width: 100%; height: auto; }
.controls { margin: 6px 0; }
.controls input[type=search] { padding: 3px 6px; width: 240px; }
.controls .s { color: var(--muted); font-size: 12px; }
details { margin: 6px 0 12px; }
summary { cursor: pointer; color: var(--accent); }
table.confusion td, table.confusion th { padding: 2px 5px; font-size: 12px; }
table.confusion td { color: var(--fg); }
.error { color: #a12622; white-space: pre-wrap; }
@media print {
  body { background: #fff; }
  main { max-width: none; padding: 0; }
  nav, .controls, td .runs { display: none; }
  h2 { break-after: avoid; }
  table, .figure { break-inside: avoid; }
}
"""

JS = """
function sortTable(th) {
  const table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
  const dir = th.dataset.dir === "desc" ? "asc" : "desc";
  table.querySelectorAll("thead th").forEach(h => h.removeAttribute("data-dir"));
  th.dataset.dir = dir;
  const key = row => {
    const cell = row.cells[col], raw = cell ? (cell.dataset.sort ?? cell.textContent.trim()) : "";
    const n = parseFloat(raw);
    return Number.isNaN(n) ? raw.toLowerCase() : n;
  };
  const order = (a, b) => {
    const x = key(a), y = key(b);
    if (typeof x !== typeof y) return typeof x === "number" ? -1 : 1;
    return x < y ? -1 : x > y ? 1 : 0;
  };
  [...body.rows].sort((a, b) => dir === "asc" ? order(a, b) : order(b, a)).forEach(r => body.appendChild(r));
}
function filterClasses(box) {
  const table = document.getElementById(box.dataset.table), q = box.querySelector("input[type=search]").value;
  const all = box.querySelector("input[type=checkbox]"), query = q.trim().toLowerCase();
  for (const row of table.tBodies[0].rows) {
    row.hidden = query !== "" && !row.dataset.name.includes(query);
    row.classList.toggle("folded", query === "" && !(all && all.checked));
  }
}
document.querySelectorAll("table.sortable thead th").forEach(th => th.addEventListener("click", () => sortTable(th)));
document.querySelectorAll(".controls").forEach(box => {
  box.querySelectorAll("input").forEach(i => i.addEventListener("input", () => filterClasses(box)));
});
"""
