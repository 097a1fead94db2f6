// Models page: while a retraining job is queued or running, reload the jobs list every few seconds.
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
  document.addEventListener("DOMContentLoaded", function () { setTimeout(refresh, EVERY_MS); });
})();
