// Keeps a page's [data-refresh="SECONDS"] part current: fetches the page again and swaps that part in.
// A failed fetch (the node restarting, a lost network) keeps the figures shown and tries again.
(function () {
  "use strict";
  var part = document.querySelector("[data-refresh]");
  if (!part) return;
  var seconds = Number(part.getAttribute("data-refresh")) || 15;
  function refresh() {
    fetch(window.location.href, { credentials: "same-origin", redirect: "manual" })
      .then(function (response) {
        if (!response.ok) throw new Error("status " + response.status);
        return response.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html").querySelector("[data-refresh]");
        if (fresh) part.innerHTML = fresh.innerHTML;
      })
      .catch(function () {})
      .then(function () { window.setTimeout(refresh, seconds * 1000); });
  }
  window.setTimeout(refresh, seconds * 1000);
})();
