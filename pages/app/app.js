// A small installable app: client-side routes under /app/ and a service worker (sw.js) that
// keeps every file of the app for offline use. No inline script: the site's
// Content-Security-Policy (script-src 'self') allows this file and nothing else.
"use strict";

var VIEWS = {
  "/app/": ["home", "Home", "This page works offline once the service worker has its copy."],
  "/app/settings": ["settings", "Settings", "A client-side route: the server answers "
                    + "/app/settings with /app/index.html ([static \"/app/\"] fallback)."],
  "/app/about": ["about", "About", "Served by onebox from pages/app/."]
};

function render() {
  var view = VIEWS[location.pathname] || ["missing", "Not found",
                                          "No such page in this app: " + location.pathname];
  var main = document.getElementById("view");
  main.textContent = "";
  var heading = document.createElement("h2");
  heading.textContent = view[1];
  var text = document.createElement("p");
  text.textContent = view[2];
  main.appendChild(heading);
  main.appendChild(text);
  document.body.dataset.view = view[0];
}

// Links marked data-route change the view without a request to the server.
document.addEventListener("click", function (event) {
  var link = event.target.closest("a[data-route]");
  if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey) {
    return;
  }
  event.preventDefault();
  history.pushState(null, "", link.getAttribute("href"));
  render();
});
window.addEventListener("popstate", render);
render();

function status(text) {
  document.getElementById("status").textContent = text;
}

// A service worker needs a secure context: https://, or http://localhost and 127.0.0.1
// (http://192.168.x.y from a phone is not one: docs/operations.md, "Serving a PWA").
if ("serviceWorker" in navigator) {
  navigator.serviceWorker.register("/app/sw.js", {scope: "/app/"}).then(function () {
    return navigator.serviceWorker.ready;
  }).then(function () {
    document.body.dataset.sw = "ready";
    status("offline copy: ready");
  }).catch(function (error) {
    document.body.dataset.sw = "failed";
    status("offline copy: failed (" + error + ")");
  });
} else {
  status("offline copy: this browser (or an http:// address that is not this machine) "
         + "has no service workers");
}
