// tokens' admin: keep every provider status badge (list and provider page) current while the
// page is open, from a small JSON view polled every few seconds; no page reload.
(function () {
  "use strict";
  const PERIOD_MS = 3000;

  function badges() {
    return Array.from(document.querySelectorAll("[data-tokens-provider]"));
  }

  async function refresh() {
    const found = badges();
    const url = found.length ? found[0].dataset.tokensUrl : null;
    if (!url) {
      return;
    }
    const ids = Array.from(new Set(found.map((el) => el.dataset.tokensProvider)));
    try {
      const response = await fetch(`${url}?ids=${ids.join(",")}`, {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (!response.ok) {
        return;
      }
      const body = await response.json();
      for (const el of found) {
        const entry = body.providers[el.dataset.tokensProvider];
        if (!entry) {
          continue;
        }
        const field = el.dataset.tokensField || "status";
        if (field === "status") {
          el.className = `tokens-status tokens-status-${entry.status}`;
          el.textContent = entry.label;
        } else if (field in entry) {
          el.textContent = entry[field];
        }
      }
    } catch (error) {
      // The next poll tries again.
    }
  }

  window.addEventListener("load", () => {
    window.setInterval(refresh, PERIOD_MS);
  });
})();
