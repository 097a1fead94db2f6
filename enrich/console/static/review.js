// The review page, keyboard first: 1–9 take a candidate, a letter opens a searchable list of every value of the
// group, s skips, c sends the item to an admin with a comment, z enlarges the photo, u undoes. Each action is a
// POST that answers with the next item's HTML, swapped in at once. Keys pressed while a request is on its way
// are queued and run in order against the item shown by then.
(function () {
  "use strict";
  const box = document.getElementById("review-item");
  const picker = document.getElementById("rv-picker");
  if (!box || !picker) { return; }
  const input = document.getElementById("rv-picker-input");
  const list = document.getElementById("rv-picker-list");
  const comment = document.getElementById("rv-comment");
  const commentInput = document.getElementById("rv-comment-input");
  const zoom = document.getElementById("rv-zoom");
  const zoomImg = document.getElementById("rv-zoom-img");
  let chain = Promise.resolve();
  let active = 0; // highlighted row in the picker
  let signedOut = false;

  function current() { return box.querySelector("#rv-current"); }
  function itemId() { const c = current(); return c ? c.dataset.item : ""; }
  function pickerOpen() { return !picker.hidden; }
  function commentOpen() { return !comment.hidden; }
  function zoomOpen() { return !zoom.hidden; }
  function enqueue(fn) { chain = chain.then(fn).catch(showError); return chain; }

  function flashEl() {
    let flash = document.getElementById("rv-flash");
    if (!flash) {
      flash = document.createElement("span");
      flash.id = "rv-flash";
      const status = box.querySelector(".rv-status") || box;
      status.appendChild(flash);
    }
    flash.className = "rv-flash error";
    return flash;
  }

  function showError(err) {
    const flash = flashEl();
    if (err && err.signedOut) {
      // a link back to this very page (filters included) once signed in again
      const a = document.createElement("a");
      a.href = "/login?next=" + encodeURIComponent(window.location.pathname + window.location.search);
      a.textContent = "Signed out — sign in again";
      flash.replaceChildren(a);
      return;
    }
    flash.textContent = "Not saved: " + (err && err.message ? err.message : String(err)) + " — reload the page.";
  }

  function signedOutError(status) {
    const err = new Error("Signed out — sign in again");
    err.status = status;
    err.signedOut = true;
    return err;
  }

  // Only the console's own fragment (_review_item.html) is ever put into the page: a sign-in page, or any
  // other page that a redirect led to, is not.
  async function act(path, data) {
    if (signedOut) { throw signedOutError(401); }
    let html;
    try {
      html = await window.enrich.post(path + window.location.search, data);
    } catch (err) {
      const msg = err && err.message ? err.message : "";
      if (err && (err.signedOut || err.status === 401 || /^40[13] /.test(msg) && /<(!doctype|html)/i.test(msg))) {
        signedOut = true;
        throw signedOutError(err.status || 401);
      }
      if (/</.test(msg)) { throw new Error("the console answered with an error"); } // never show markup
      throw err;
    }
    if (typeof html !== "string" || !html.trimStart().startsWith('<div class="rv-status">')) {
      signedOut = true;
      throw signedOutError(401);
    }
    box.innerHTML = html; // server-rendered and escaped
    box.dispatchEvent(new CustomEvent("review:item", { bubbles: true }));
  }

  function take(value) {
    const id = itemId();
    if (!id) { return Promise.resolve(); }
    return act("/review/" + encodeURIComponent(id) + "/take", { value: value });
  }
  function skip() {
    const id = itemId();
    if (!id) { return Promise.resolve(); }
    return act("/review/" + encodeURIComponent(id) + "/skip");
  }
  function flag(note) {
    const id = itemId();
    if (!id) { return Promise.resolve(); }
    return act("/review/" + encodeURIComponent(id) + "/flag", { note: note });
  }
  function undo() { return act("/review/undo"); }

  // ------------------------------------------------------------------------------------------- picker
  function values() {
    return Array.from(box.querySelectorAll(".rv-values li")).map(function (li) { return li.dataset.value; });
  }

  function renderList() {
    const q = input.value.trim().toLowerCase();
    const shown = values().filter(function (v) { return v.toLowerCase().includes(q); });
    // values starting with the text first, then the others that contain it
    shown.sort(function (a, b) {
      return (a.toLowerCase().startsWith(q) ? 0 : 1) - (b.toLowerCase().startsWith(q) ? 0 : 1);
    });
    list.replaceChildren();
    shown.forEach(function (v, i) {
      const li = document.createElement("li");
      li.textContent = v; // text, never HTML
      li.dataset.value = v;
      li.setAttribute("role", "option");
      if (i === 0) { li.classList.add("on"); }
      li.addEventListener("mousedown", function (e) { e.preventDefault(); choose(v); });
      list.appendChild(li);
    });
    active = 0;
  }

  function move(delta) {
    const rows = list.querySelectorAll("li");
    if (!rows.length) { return; }
    rows[active].classList.remove("on");
    active = (active + delta + rows.length) % rows.length;
    rows[active].classList.add("on");
    rows[active].scrollIntoView({ block: "nearest" });
  }

  function openPicker(text) {
    if (!itemId()) { return; }
    picker.hidden = false;
    input.value = text || "";
    renderList();
    input.focus();
  }

  function closePicker() {
    picker.hidden = true;
    input.blur();
  }

  function choose(value) {
    closePicker();
    enqueue(function () { return take(value); });
  }

  input.addEventListener("input", renderList);
  input.addEventListener("keydown", function (e) {
    if (e.key === "Escape") { e.preventDefault(); closePicker(); }
    else if (e.key === "ArrowDown") { e.preventDefault(); move(1); }
    else if (e.key === "ArrowUp") { e.preventDefault(); move(-1); }
    else if (e.key === "Enter") {
      e.preventDefault();
      const row = list.querySelectorAll("li")[active];
      if (row) { choose(row.dataset.value); }
    }
    e.stopPropagation(); // typing in the list is not a shortcut
  });
  picker.addEventListener("mousedown", function (e) { if (e.target === picker) { closePicker(); } });

  // ------------------------------------------------------------------------------ unsure: a comment
  function openComment() {
    if (!itemId() || !box.querySelector('[data-act="flag"]')) { return; } // nothing shown, or flagged already
    comment.hidden = false;
    commentInput.value = "";
    commentInput.focus();
  }

  function closeComment() {
    comment.hidden = true;
    commentInput.blur();
  }

  commentInput.addEventListener("keydown", function (e) {
    if (e.key === "Escape") { e.preventDefault(); closeComment(); }
    else if (e.key === "Enter") {
      e.preventDefault();
      const note = commentInput.value.trim();
      if (!note) { return; } // a comment is what the admin needs
      closeComment();
      enqueue(function () { return flag(note); });
    }
    e.stopPropagation(); // typing the comment is not a shortcut
  });
  comment.addEventListener("mousedown", function (e) { if (e.target === comment) { closeComment(); } });

  // ------------------------------------------------------------------------------------- photo zoom
  function openZoom(img) {
    const photo = img || box.querySelector(".rv-zoomable");
    if (!photo) { return; }
    zoomImg.src = photo.getAttribute("src"); // the same thumbnail, shown large
    zoomImg.alt = photo.alt + ", enlarged";
    zoom.hidden = false;
  }

  function closeZoom() {
    zoom.hidden = true;
    zoomImg.removeAttribute("src");
  }

  zoom.addEventListener("click", closeZoom);

  // ------------------------------------------------------------------------------ the lease countdown
  let leaseTimer = null;

  function startLease() {
    if (leaseTimer) { clearInterval(leaseTimer); leaseTimer = null; }
    const el = box.querySelector("#rv-lease");
    if (!el) { return; }
    const ends = Date.now() + Number(el.dataset.left || 0) * 1000;
    const shown = el.querySelector(".num");
    function tick() {
      const left = Math.max(0, Math.round((ends - Date.now()) / 1000));
      if (left === 0) {
        el.textContent = "your hold on this item ran out: another reviewer may take it (reload to hold it again)";
        el.classList.add("error");
        clearInterval(leaseTimer);
        leaseTimer = null;
        return;
      }
      shown.textContent = Math.floor(left / 60) + ":" + String(left % 60).padStart(2, "0");
    }
    leaseTimer = setInterval(tick, 1000);
  }

  box.addEventListener("review:item", function () { closeZoom(); startLease(); });
  startLease();

  // --------------------------------------------------------------------------------------------- keys
  function handleKey(k) {
    if (pickerOpen()) { // a key typed before the list had opened: it was meant for the search box
      input.value += k;
      renderList();
      return undefined;
    }
    if (commentOpen()) { // the same for the comment box
      commentInput.value += k;
      return undefined;
    }
    if (k >= "1" && k <= "9") {
      const c = box.querySelector('.rv-cand[data-key="' + k + '"]');
      return c ? take(c.dataset.value) : undefined;
    }
    if (k === "z") {
      if (zoomOpen()) { closeZoom(); } else { openZoom(null); }
      return undefined;
    }
    if (zoomOpen()) { closeZoom(); }
    if (k === "s") { return skip(); }
    if (k === "u") { return undo(); }
    if (k === "c") { openComment(); return undefined; }
    openPicker(k);
    return undefined;
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) { return; }
    const t = e.target;
    if (t && t.closest && t.closest("input, select, textarea, [contenteditable]")) { return; } // the filters
    if (e.key === "Escape" && zoomOpen()) { e.preventDefault(); closeZoom(); return; }
    if (!/^[1-9a-zA-Z]$/.test(e.key)) { return; }
    e.preventDefault();
    const k = e.key;
    enqueue(function () { return handleKey(k); });
  });

  // ------------------------------------------------------------------------------------ mouse as well
  box.addEventListener("click", function (e) {
    const photo = e.target.closest(".rv-zoomable");
    if (photo) { openZoom(photo); return; }
    const cand = e.target.closest(".rv-cand");
    if (cand) { cand.blur(); enqueue(function () { return take(cand.dataset.value); }); return; }
    const btn = e.target.closest("[data-act]");
    if (!btn) { return; }
    btn.blur();
    if (btn.dataset.act === "skip") { enqueue(skip); }
    else if (btn.dataset.act === "undo") { enqueue(undo); }
    else if (btn.dataset.act === "flag") { enqueue(openComment); }
    else if (btn.dataset.act === "pick") { enqueue(function () { openPicker(""); }); }
  });
})();
