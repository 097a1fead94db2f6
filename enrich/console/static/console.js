// Shared by every page: POST with the page's CSRF token (sent as a header), JSON back.
window.enrich = {
  csrf: function () { return document.querySelector('meta[name="csrf-token"]').content; },
  post: async function (url, data) {
    const body = new URLSearchParams(data || {});
    const res = await fetch(url, { method: "POST", body: body, credentials: "same-origin",
                                   headers: { "X-CSRF-Token": window.enrich.csrf() } });
    const type = res.headers.get("content-type") || "";
    // signed out: 401 from the console, or a redirect that fetch followed to the sign-in page
    if (res.status === 401 || (res.redirected && new URL(res.url).pathname === "/login")) {
      const err = new Error("Signed out — sign in again");
      err.status = 401;
      err.signedOut = true;
      throw err;
    }
    if (!res.ok) {
      // the console's plain-text errors are meant for people; an HTML page never goes into a message
      const text = type.startsWith("text/plain") ? (await res.text()).slice(0, 300) : "the console answered " + res.status;
      const err = new Error(text);
      err.status = res.status;
      throw err;
    }
    return type.includes("json") ? res.json() : res.text();
  },
};
