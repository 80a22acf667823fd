// adapt ui: click a table header to sort (numbers by their data-value, text otherwise);
// rows of class "reference" stay on top. Part of adapterhub-c, Apache-2.0 (see LICENSE.md here).
"use strict";
(function () {
  function cellKey(row, index) {
    var cell = row.cells[index];
    if (!cell) return "";
    var raw = cell.getAttribute("data-value");
    if (raw !== null && raw !== "" && !isNaN(Number(raw))) return Number(raw);
    return cell.textContent.trim().toLowerCase();
  }
  function compare(a, b) {
    var an = typeof a === "number", bn = typeof b === "number";
    if (an && bn) return a - b;
    if (an) return -1;
    if (bn) return 1;
    return a < b ? -1 : a > b ? 1 : 0;
  }
  function sortBy(table, th, index) {
    var body = table.tBodies[0];
    if (!body) return;
    var descending = th.getAttribute("aria-sort") === "ascending";
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    var rows = Array.prototype.slice.call(body.rows);
    var pinned = rows.filter(function (r) { return r.classList.contains("reference"); });
    var rest = rows.filter(function (r) { return !r.classList.contains("reference"); });
    rest.sort(function (x, y) {
      var c = compare(cellKey(x, index), cellKey(y, index));
      return descending ? -c : c;
    });
    pinned.concat(rest).forEach(function (r) { body.appendChild(r); });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      if (!table.tHead) return;
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, index) {
        th.addEventListener("click", function () { sortBy(table, th, index); });
      });
    });
  });
})();
