// The app's service worker. onebox serves it with Cache-Control: no-cache ([static]
// service_worker_scripts), so that registration.update() sees a new version at once: change
// VERSION (or any byte) with each deploy and browsers install the new worker, which fetches
// the files below again and drops the old copy.
"use strict";

var VERSION = "v1";
var CACHE = "app-" + VERSION;
var PRECACHE = [
  "/app/",
  "/app/app.js",
  "/app/app.css",
  "/app/manifest.webmanifest",
  "/app/icon-192.png",
  "/app/icon-512.png"
];

self.addEventListener("install", function (event) {
  // cache: "reload" fetches each file from the server, not from the browser's HTTP cache,
  // which may hold a copy up to [static] max_age_s old (fingerprinted names avoid the
  // question: app.3f9a1c.js never changes)
  event.waitUntil(caches.open(CACHE).then(function (cache) {
    return cache.addAll(PRECACHE.map(function (url) {
      return new Request(url, {cache: "reload"});
    }));
  }).then(function () {
    return self.skipWaiting();
  }));
});

self.addEventListener("activate", function (event) {
  event.waitUntil(caches.keys().then(function (names) {
    return Promise.all(names.filter(function (name) {
      return name.indexOf("app-") === 0 && name !== CACHE;
    }).map(function (name) {
      return caches.delete(name);
    }));
  }).then(function () {
    return self.clients.claim();
  }));
});

self.addEventListener("fetch", function (event) {
  var request = event.request;
  if (request.method !== "GET") {
    return;
  }
  if (request.mode === "navigate") {
    // a page: the network first (new deploys show at once), else the cached app shell,
    // which routes /app/settings and the rest in the browser
    event.respondWith(fetch(request).catch(function () {
      return caches.match("/app/", {cacheName: CACHE});
    }));
    return;
  }
  event.respondWith(caches.match(request, {cacheName: CACHE}).then(function (found) {
    return found || fetch(request);
  }));
});
