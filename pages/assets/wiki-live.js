// A wiki page's live notice (handlers/templates/wiki/page.html): the page follows its events,
// GET /wiki/<page>/events (server-sent events; "edited" with {"page", "rev", "by"}), and when
// a revision newer than the one shown is saved, it shows the notice it holds hidden. A file,
// not an inline script: the wiki's pages run scripts from this site only (handlers/_core.py,
// PAGE_POLICY). Loaded after live.js, which follows the stream.
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

  // When events may have been missed (a "reset", or a new stream), the page itself says its
  // revision now. After a restart every reader asks at once: each waits a moment at random
  // first.
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

  // The first stream's start is the page just rendered; a later one's (after a refusal, or
  // back from the back-forward cache) may have missed an edit: the page is asked again.
  let rendered = true;
  live(notice.dataset.events, {
    start: () => { if (!rendered) check(); rendered = false; },
    edited: (data) => edited(data.rev),
    reset: check,
  }, notice);
})();
