// Keeps the sessions table live: the server sends the table's body (already escaped HTML
// rendered by its templates) whenever it changes. No data is turned into markup here.
(function () {
  "use strict";
  var body = document.getElementById("session-rows");
  var live = document.getElementById("live");
  if (!body || !window.EventSource) { return; }
  var source = new EventSource(body.getAttribute("data-stream"));
  source.addEventListener("rows", function (event) {
    body.innerHTML = JSON.parse(event.data).html;
    live.className = "live on";
  });
  source.onerror = function () { live.className = "live off"; };
})();
