// Shared by every page: POST with the page's CSRF token (sent as a header), JSON back.
window.enrich = {
  csrf: function () { return document.querySelector('meta[name="csrf-token"]').content; },
  post: async function (url, data) {
    const body = new URLSearchParams(data || {});
    const res = await fetch(url, { method: "POST", body: body, credentials: "same-origin",
                                   headers: { "X-CSRF-Token": window.enrich.csrf() } });
    if (!res.ok) { throw new Error(res.status + " " + (await res.text()).slice(0, 200)); }
    return res.headers.get("content-type", "").includes("json") ? res.json() : res.text();
  },
};
