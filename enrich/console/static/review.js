// The review page, keyboard first: 1–9 take a candidate, a letter opens a searchable list of every value of the
// group, s skips, u undoes. Each action is a POST that answers with the next item's HTML, swapped in at once.
// Keys pressed while a request is on its way are queued and run in order against the item shown by then.
(function () {
  "use strict";
  const box = document.getElementById("review-item");
  const picker = document.getElementById("rv-picker");
  if (!box || !picker) { return; }
  const input = document.getElementById("rv-picker-input");
  const list = document.getElementById("rv-picker-list");
  let chain = Promise.resolve();
  let active = 0; // highlighted row in the picker

  function current() { return box.querySelector("#rv-current"); }
  function itemId() { const c = current(); return c ? c.dataset.item : ""; }
  function pickerOpen() { return !picker.hidden; }
  function enqueue(fn) { chain = chain.then(fn).catch(showError); return chain; }

  function showError(err) {
    let flash = document.getElementById("rv-flash");
    if (!flash) {
      flash = document.createElement("span");
      flash.id = "rv-flash";
      const status = box.querySelector(".rv-status") || box;
      status.appendChild(flash);
    }
    flash.className = "rv-flash error";
    flash.textContent = "Not saved: " + (err && err.message ? err.message : String(err)) + " — reload the page.";
  }

  async function act(path, data) {
    const html = await window.enrich.post(path + window.location.search, data);
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

  // --------------------------------------------------------------------------------------------- keys
  function handleKey(k) {
    if (pickerOpen()) { // a key typed before the list had opened: it was meant for the search box
      input.value += k;
      renderList();
      return undefined;
    }
    if (k >= "1" && k <= "9") {
      const c = box.querySelector('.rv-cand[data-key="' + k + '"]');
      return c ? take(c.dataset.value) : undefined;
    }
    if (k === "s") { return skip(); }
    if (k === "u") { return undo(); }
    openPicker(k);
    return undefined;
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) { return; }
    const t = e.target;
    if (t && t.closest && t.closest("input, select, textarea, [contenteditable]")) { return; } // the filters
    if (!/^[1-9a-zA-Z]$/.test(e.key)) { return; }
    e.preventDefault();
    const k = e.key;
    enqueue(function () { return handleKey(k); });
  });

  // ------------------------------------------------------------------------------------ mouse as well
  box.addEventListener("click", function (e) {
    const cand = e.target.closest(".rv-cand");
    if (cand) { cand.blur(); enqueue(function () { return take(cand.dataset.value); }); return; }
    const btn = e.target.closest("[data-act]");
    if (!btn) { return; }
    btn.blur();
    if (btn.dataset.act === "skip") { enqueue(skip); }
    else if (btn.dataset.act === "undo") { enqueue(undo); }
    else if (btn.dataset.act === "pick") { enqueue(function () { openPicker(""); }); }
  });
})();
