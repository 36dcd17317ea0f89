// A wiki page's live notice (handlers/templates/wiki/page.html): the page follows its events,
// GET /wiki/<page>/events (server-sent events; "edited" with {"page", "rev", "by"}), and when
// a revision newer than the one shown is saved, it shows the notice it holds hidden. A file,
// not an inline script: the wiki's pages run scripts from this site only (handlers/_core.py,
// PAGE_POLICY).
"use strict";

(function () {
  const notice = document.getElementById("edited");
  if (!notice || !window.EventSource) return;
  let newest = Number(notice.dataset.rev);

  function edited(rev) {
    if (!(rev > newest)) return;
    newest = rev;
    notice.querySelector(".rev").textContent = String(rev);
    notice.hidden = false;
  }

  // When events may have been missed (a "reset", or a reconnection with no event id to send:
  // none had come), the page itself says its revision now. After a restart every reader asks
  // at once: each waits a moment at random first.
  function check() {
    setTimeout(async () => {
      try {
        const response = await fetch(location.pathname, {cache: "no-store"});
        if (!response.ok) return;
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        const current = page.getElementById("edited");
        if (current) edited(Number(current.dataset.rev));
      } catch (e) {
        // offline: the stream's next reconnection asks again
      }
    }, Math.random() * 3000);
  }

  // EventSource reconnects by itself after a dropped stream; after a refusal (429: too many
  // streams from this client; 503) it stops for good, so this page tries again, backing off.
  const RETRY_FIRST_MS = 2000, RETRY_MOST_MS = 60000;
  let retryMs = RETRY_FIRST_MS;
  let opened = false;
  let source = null;                     // the stream followed now
  let retrying = null;                   // the timer of the next try after a refusal

  function follow() {
    retrying = null;
    source = new EventSource(notice.dataset.events);
    let sawId = false;
    source.onopen = () => {
      retryMs = RETRY_FIRST_MS;
      notice.dataset.following = "yes";  // (what a test waits for before it edits the page)
      if (opened && !sawId) check();     // (the first time, the page was just rendered)
      opened = true;
    };
    source.addEventListener("edited", (event) => {
      sawId = true;
      try { edited(JSON.parse(event.data).rev); } catch (e) { /* not ours: ignored */ }
    });
    source.addEventListener("reset", () => {
      sawId = true;
      check();
    });
    source.onerror = () => {
      delete notice.dataset.following;
      opened = true;                     // what follows a failure may have missed an edit
      if (source.readyState === EventSource.CLOSED) {
        retrying = setTimeout(follow, retryMs);
        retryMs = Math.min(2 * retryMs, RETRY_MOST_MS);
      }
    };
  }

  // A page left for another may be kept, frozen, to come back to (the back-forward cache),
  // with its stream still open: one of the few a client may hold. Closed when left; followed
  // again (and the revision checked) when shown again.
  addEventListener("pagehide", () => {
    clearTimeout(retrying);
    source.close();
    delete notice.dataset.following;
    opened = true;
  });
  addEventListener("pageshow", (event) => {
    if (event.persisted) follow();
  });

  follow();
})();
