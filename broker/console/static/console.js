// credbroker console: the only script (served from 'self'; the pages work without it).
// Live approvals over server-sent events, countdowns, "select all". No eval, no inline.
"use strict";
(function () {
  function live(section) {
    var status = document.getElementById("live-status");
    var busy = false, again = false;
    function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      fetch(section.dataset.src, { credentials: "same-origin", cache: "no-store" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) {
          // keep reasons being typed across the refresh
          var kept = {};
          section.querySelectorAll("textarea[data-keep]").forEach(function (t) {
            kept[t.dataset.keep] = t.value;
          });
          var focused = document.activeElement && document.activeElement.dataset
            ? document.activeElement.dataset.keep : undefined;
          section.innerHTML = html;
          section.querySelectorAll("textarea[data-keep]").forEach(function (t) {
            if (kept[t.dataset.keep]) { t.value = kept[t.dataset.keep]; }
            if (focused && t.dataset.keep === focused) { t.focus(); }
          });
          tick();
        })
        .catch(function () { if (status) { status.textContent = "refresh failed"; } })
        .finally(function () { busy = false; if (again) { again = false; refresh(); } });
    }
    var es = new EventSource("/events");
    es.addEventListener("open", function () { if (status) { status.textContent = "live"; } });
    es.addEventListener("error", function () {
      if (status) { status.textContent = "reconnecting…"; }
    });
    es.addEventListener("approvals", refresh);
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll(".countdown[data-expires]").forEach(function (el) {
      var left = Math.max(0, Math.round((Date.parse(el.dataset.expires) - now) / 1000));
      el.textContent = left > 0 ? Math.floor(left / 60) + " min " + (left % 60) + " s"
                                : "expired";
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    var section = document.getElementById("approvals-live");
    if (section) { live(section); }
    tick();
    setInterval(tick, 1000);
    var all = document.getElementById("select-all");
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll('input[name="credential_id"]').forEach(function (b) {
          b.checked = all.checked;
        });
      });
    }
  });
})();
