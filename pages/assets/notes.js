// The notes page (pages/notes.html): the list, the form, and live changes from every other tab,
// through GET /api/notes/events (server-sent events; handlers/notes.py says what each holds).
// A file, not an inline script, so that a Content-Security-Policy of script-src 'self' (the
// server's own pages send one; [static] extra_headers may give the static pages one) allows it.
"use strict";

const list = document.getElementById("notes");
const error = document.getElementById("error");
const more = document.getElementById("more");
const shown = new Map();   // note id -> {note, item, text}: what this tab shows
const gone = new Set();    // ids deleted while the page is open: an id is never reused, so a
                           // late event of a deleted note must not bring it back
let next = null;           // the ?after= of the listing's next page; null: every note is shown
let queued = null;         // while the list loads: the events that came meanwhile, in order

async function call(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {"Accept": "application/json", "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!response.ok) {
    const detail = await response.json().catch(() => ({error: response.statusText}));
    throw new Error(detail.error || response.statusText);
  }
  return response.status === 204 ? null : response.json();
}

// A note comes from the listing, a POST's answer and the "created" event: shown once, by id.
function show(note) {
  if (gone.has(note.id)) return;
  const known = shown.get(note.id);
  if (known) {
    replace(known, note);
    return;
  }
  const entry = {note, item: document.createElement("li"), text: document.createElement("span")};
  entry.text.textContent = note.text;
  const edit = document.createElement("button");
  edit.textContent = "Edit";
  edit.onclick = () => run(async () => {
    const changed = prompt("Edit note", entry.note.text);
    if (changed === null) return;
    replace(entry, await call("PUT", "/api/notes/" + note.id, {text: changed}));
  });
  const remove = document.createElement("button");
  remove.textContent = "Delete";
  remove.onclick = () => run(async () => {
    await call("DELETE", "/api/notes/" + note.id);
    forget(note.id);
  });
  entry.item.append(entry.text, edit, remove);
  shown.set(note.id, entry);
  list.append(entry.item);
}

// Events are published after each write commits, so two racing writes may arrive in the
// other order: the later "updated" time wins.
function replace(entry, note) {
  if (note.updated < entry.note.updated) return;
  entry.note = note;
  entry.text.textContent = note.text;
}

function forget(id) {
  gone.add(id);
  const entry = shown.get(id);
  if (entry) {
    entry.item.remove();
    shown.delete(id);
  }
}

async function run(action) {
  error.textContent = "";
  try { await action(); } catch (e) { error.textContent = e.message; }
}

document.getElementById("add").onsubmit = (event) => {
  event.preventDefault();
  const input = document.getElementById("text");
  run(async () => {
    show(await call("POST", "/api/notes", {text: input.value}));
    input.value = "";
  });
};

// A listing sends at most 100 notes; "next" says where the following page starts. While a
// page of it loads, events wait: one may be of a note the listing does not hold yet.
async function loading(work) {
  if (queued !== null) return;         // one load at a time
  queued = [];
  try {
    await work();
  } finally {
    const waiting = queued;
    queued = null;
    waiting.forEach(([kind, data]) => receive(kind, data));
  }
}

async function load() {
  const page = await call("GET", "/api/notes" + (next === null ? "" : "?after=" + next));
  page.notes.forEach(show);
  next = page.next;
  more.hidden = next === null;
}

function reload() {
  return run(() => loading(async () => {
    list.replaceChildren();
    shown.clear();
    next = null;
    await load();
  }));
}

more.onclick = () => run(() => loading(load));

// --- live: what the other tabs (and everyone else) change ---------------------------------

function receive(kind, data) {
  if (kind !== "reset" && !(data && typeof data.id === "string")) return;   // not a note's
  if (queued !== null) {
    queued.push([kind, data]);
  } else if (kind === "reset") {
    reload();
  } else if (kind === "deleted") {
    forget(data.id);
  } else if (data.text === undefined) {
    // too large for an event (handlers/notes.py): the note is fetched
    run(async () => arrived(kind, await call("GET", "/api/notes/" + data.id)));
  } else {
    arrived(kind, data);
  }
}

function arrived(kind, note) {
  if (kind === "created" && next === null) {
    show(note);                        // (with more pages to load, it comes with the last)
  } else if (kind === "updated" && shown.has(note.id)) {
    replace(shown.get(note.id), note);
  }
}

// Followed before the list is read, so that no change falls between them (live.js says when
// the list is read again: start)
live("/api/notes/events", {
  start: reload,
  created: (data) => receive("created", data),
  updated: (data) => receive("updated", data),
  deleted: (data) => receive("deleted", data),
  reset: () => receive("reset"),
}, list);
