// Models page: while a retraining job is queued or running, reload the jobs list every few seconds; before a
// promotion or a rollback is sent, show the dialog the page rendered for it (what will change).
(function () {
  const EVERY_MS = 3000;
  async function refresh() {
    const list = document.getElementById("jobs-list");
    if (!list || list.dataset.live !== "1") { return; }
    try {
      const res = await fetch("/models/jobs", { credentials: "same-origin" });
      if (res.ok) {
        const holder = document.createElement("div");
        holder.innerHTML = await res.text();  // server-rendered, escaped by the template
        const fresh = holder.querySelector("#jobs-list");
        if (fresh) { list.replaceWith(fresh); }
      }
    } catch (e) { /* the console is restarting: try again next tick */ }
    setTimeout(refresh, EVERY_MS);
  }

  // Without this (no JS, no <dialog>) the form posts as it is: the server decides on its own either way.
  function confirmFirst(form) {
    const dialog = document.getElementById(form.dataset.confirm);
    if (!dialog || typeof dialog.showModal !== "function") { return; }
    const yes = dialog.querySelector(".confirm-yes");
    form.addEventListener("submit", function (event) {
      event.preventDefault();  // the browser has checked the required reason already
      const reason = form.querySelector("input[name=reason]");
      const shown = dialog.querySelector(".confirm-reason");
      if (reason && shown) { shown.textContent = reason.value; }
      yes.disabled = false;
      dialog.showModal();
      dialog.querySelector(".confirm-no").focus();  // Enter on an open dialog must not confirm by accident
    });
    yes.addEventListener("click", function () {
      yes.disabled = true;  // one click, one POST
      dialog.close();
      form.submit();  // not requestSubmit(): that would open the dialog again
    });
    dialog.querySelector(".confirm-no").addEventListener("click", function () { dialog.close(); });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form[data-confirm]").forEach(confirmFirst);
    setTimeout(refresh, EVERY_MS);
  });
})();
