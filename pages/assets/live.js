// Following a server-sent event stream from a page (docs/areas.md, "Live events"), the part
// every live page shares: pages/assets/notes.js and wiki-live.js use it.
//
//   live(url, {start, <event name>: handler, ...}, marker)
//
// start() runs each time a stream opens with no position of its own to resume from: the first
// time, and after a refusal or a return from the back-forward cache (a new EventSource, which
// sends no Last-Event-ID). The page reads its state then; a stream that dropped and reconnected
// by itself resumes where it was (the server replays what it missed, or sends "reset").
// handler(data) gets an event's data, parsed as JSON when it is JSON. marker.dataset.following
// is "yes" while a stream is open (what the browser tests wait for).
"use strict";

function live(url, handlers, marker) {
  // EventSource reconnects by itself after a dropped stream, but stops for good after a
  // refusal (429: too many streams from this client; 503): this tries again, backing off.
  const RETRY_FIRST_MS = 2000, RETRY_MOST_MS = 60000;
  let retryMs = RETRY_FIRST_MS;
  let source = null;                   // the stream followed now
  let retrying = null;                 // the timer of the next try after a refusal
  let started = false;                 // start() has run once

  function follow() {
    retrying = null;
    source = new EventSource(url);
    let fresh = true;                  // no id of its own yet: nothing to resume from
    source.onopen = () => {
      retryMs = RETRY_FIRST_MS;
      marker.dataset.following = "yes";
      if (fresh) begin();
      fresh = false;
    };
    for (const name of Object.keys(handlers)) {
      if (name === "start") continue;
      source.addEventListener(name, (event) => {
        let data = event.data;
        try { data = JSON.parse(data); } catch (e) { /* text: passed as it is */ }
        handlers[name](data);
      });
    }
    source.onerror = () => {
      delete marker.dataset.following;
      if (source.readyState === EventSource.CLOSED) {
        if (!started) begin();         // refused the first time: show the state anyway
        fresh = false;
        retrying = setTimeout(follow, retryMs);
        retryMs = Math.min(2 * retryMs, RETRY_MOST_MS);
      }
    };
  }

  function begin() {
    started = true;
    if (handlers.start) handlers.start();
  }

  // A page left for another may be kept, frozen, to come back to (the back-forward cache),
  // with its stream still open: one of the few a client may hold. Closed when left; followed
  // again when shown again.
  addEventListener("pagehide", () => {
    clearTimeout(retrying);
    source.close();
    delete marker.dataset.following;
  });
  addEventListener("pageshow", (event) => {
    if (event.persisted) follow();
  });
  follow();
}
