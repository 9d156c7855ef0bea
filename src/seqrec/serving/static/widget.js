/* seqrec widget: a "you may also like" strip that follows the shopper's clicks.
 *
 * The session (item ids, oldest first) lives in the browser (sessionStorage); every click calls
 * POST /recommendations and re-renders the strip. Embed it on any product page:
 *
 *   <div id="recs"></div>
 *   <script src="https://shop.example/widget/widget.js"></script>
 *   <script>
 *     const strip = SeqrecWidget.mount(document.getElementById("recs"), {apiBase: "https://api.example", k: 8});
 *     strip.view("12345");   // call on each product view
 *   </script>
 *
 * On another origin than the API's (as above), start the service with
 * `seqrec-serve EXPORT_DIR --cors-origin https://shop.example` so the browser lets the page call it.
 */
(function () {
  "use strict";
  const STORAGE_KEY = "seqrec.session";
  const MAX_ID_LENGTH = 64; // the API's longest item id (seqrec.serving.app.MAX_ID_LENGTH)
  const MAX_SESSION = 200; // clicks kept in the browser (the API's default max_session_len)
  /* Used when GET /limits cannot be read (an older service): the API's defaults. */
  const DEFAULT_LIMITS = { max_k: 100, max_session_len: MAX_SESSION, max_filter_items: 10000 };

  function hashCode(text) {
    let h = 2166136261;
    for (let i = 0; i < text.length; i++) {
      h ^= text.charCodeAt(i);
      h = Math.imul(h, 16777619);
    }
    return h >>> 0;
  }

  /* Deterministic fake product data for the demo shop (the catalog has ids only). */
  const NOUNS = ["Lamp", "Mug", "Backpack", "Sneakers", "Headphones", "Teapot", "Scarf", "Notebook",
    "Watch", "Chair", "Jacket", "Speaker", "Plant pot", "Blanket", "Bottle", "Sunglasses"];
  const ADJECTIVES = ["Nordic", "Classic", "Urban", "Cosy", "Bold", "Minimal", "Retro", "Bright"];
  function product(itemId) {
    const h = hashCode(String(itemId));
    return {
      id: String(itemId),
      name: ADJECTIVES[h % ADJECTIVES.length] + " " + NOUNS[(h >>> 8) % NOUNS.length],
      price: (5 + ((h >>> 4) % 19000) / 100).toFixed(2),
      hue: h % 360,
    };
  }

  function card(itemId, extraClass) {
    const p = product(itemId);
    const el = document.createElement("button");
    el.type = "button";
    el.className = "product-card " + (extraClass || "");
    el.dataset.itemId = p.id;
    el.title = p.name + " (item " + p.id + ")";
    const swatch = document.createElement("div");
    swatch.className = "swatch";
    swatch.style.background =
      "linear-gradient(135deg, hsl(" + p.hue + ",70%,72%), hsl(" + ((p.hue + 40) % 360) + ",65%,52%))";
    swatch.textContent = p.name.split(" ")[1].charAt(0);
    const name = document.createElement("div");
    name.className = "name";
    name.textContent = p.name;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "€" + p.price + " · #" + p.id;
    el.append(swatch, name, meta);
    return el;
  }

  /* Ids the API accepts (1 to 64 characters): one it would refuse must not enter the session,
   * or every later request (which sends it in `session` or `deny_items`) would get 422. */
  function isItemId(itemId) {
    return itemId.length >= 1 && itemId.length <= MAX_ID_LENGTH;
  }

  function loadSession() {
    try {
      const raw = window.sessionStorage.getItem(STORAGE_KEY);
      const parsed = raw ? JSON.parse(raw) : [];
      return Array.isArray(parsed) ? parsed.map(String).filter(isItemId) : [];
    } catch (e) {
      return [];
    }
  }

  function saveSession(items) {
    try {
      window.sessionStorage.setItem(STORAGE_KEY, JSON.stringify(items));
    } catch (e) {
      /* storage may be disabled: the session then lives in memory only */
    }
  }

  /* The service's request limits (GET /limits): the defaults when the service has no such
   * route, and `read: false` when it did not answer (then it is asked again next time). */
  async function fetchLimits(apiBase) {
    try {
      const response = await fetch(apiBase + "/limits");
      const limits = response.ok ? await response.json() : {};
      return { limits: Object.assign({}, DEFAULT_LIMITS, limits), read: true };
    } catch (e) {
      return { limits: DEFAULT_LIMITS, read: false };
    }
  }

  /* The request for `session` within the service's limits: at most max_k items, the most
   * recent max_session_len clicks (the model reads only the most recent ones anyway) and,
   * when seen items are excluded, the older clicks as deny_items (newest first, at most
   * max_filter_items). Older clicks beyond that list are hidden here instead: `hidden` counts
   * them, and k grows by as many (up to max_k) so that the strip stays full. */
  function requestBody(session, k, exclude, limits) {
    const recent = session.slice(-limits.max_session_len);
    const older = [];
    if (exclude && recent.length < session.length) {
      const sent = new Set(recent);
      for (let i = session.length - recent.length - 1; i >= 0; i--) {
        const id = session[i];
        if (!sent.has(id)) {
          sent.add(id);
          older.push(id);
        }
      }
    }
    const denied = older.slice(0, limits.max_filter_items);
    const hidden = older.length - denied.length;
    const body = {
      session: recent,
      k: Math.max(1, Math.min(k + hidden, limits.max_k)),
      exclude_seen: exclude,
    };
    if (denied.length) body.deny_items = denied;
    return body;
  }

  /* Mount a recommendation strip in `container`.
   * options: apiBase (""), k (8), excludeSeen (true or a function returning a boolean),
   *          onClick(itemId) for clicks on a recommended item, onUpdate(response).
   * Requests stay within the service's limits (GET /limits, read again after a 422 or when it
   * could not be read): k is lowered to its max_k, and only the most recent max_session_len
   * clicks are sent as the session. With excludeSeen, no clicked item is ever shown.
   */
  function mount(container, options) {
    const opts = Object.assign({ apiBase: "", k: 8, excludeSeen: true }, options || {});
    let limits = fetchLimits(opts.apiBase);
    let session = loadSession();
    let version = Number(container.dataset.version || 0);
    let pending = null;

    function excludeSeen() {
      return typeof opts.excludeSeen === "function" ? !!opts.excludeSeen() : !!opts.excludeSeen;
    }

    async function refresh() {
      if (pending) pending.abort();
      const controller = new AbortController();
      pending = controller;
      container.dataset.state = "loading";
      try {
        let data = null;
        for (let attempt = 0; data === null; attempt++) {
          const known = await limits;
          if (!known.read) limits = fetchLimits(opts.apiBase); // read it again next time
          const exclude = excludeSeen();
          const body = requestBody(session, opts.k, exclude, known.limits);
          if (controller.signal.aborted) return;
          const response = await fetch(opts.apiBase + "/recommendations", {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify(body),
            signal: controller.signal,
          });
          if (response.status === 422 && attempt === 0) {
            limits = fetchLimits(opts.apiBase); // the service may have restarted with new limits
            continue;
          }
          if (!response.ok) throw new Error("HTTP " + response.status);
          data = await response.json();
          if (exclude) {
            const seen = new Set(session);
            data.items = data.items.filter((item) => !seen.has(String(item.item_id)));
          }
          data.items = data.items.slice(0, opts.k);
        }
        render(data);
        if (opts.onUpdate) opts.onUpdate(data);
      } catch (err) {
        if (err.name === "AbortError") return;
        container.dataset.state = "error";
        container.textContent = "Recommendations are unavailable right now.";
      } finally {
        if (pending === controller) pending = null;
      }
    }

    function render(data) {
      container.replaceChildren(
        ...data.items.map((item) => {
          const el = card(item.item_id, "rec-card");
          el.dataset.source = item.source;
          el.addEventListener("click", () => {
            view(item.item_id);
            if (opts.onClick) opts.onClick(item.item_id);
          });
          return el;
        })
      );
      if (!data.items.length) container.textContent = "Nothing to recommend.";
      version += 1;
      container.dataset.version = String(version);
      container.dataset.state = "ready";
      container.dataset.modelVersion = data.model_version;
      container.dataset.usedFallback = String(data.used_fallback);
    }

    function view(itemId) {
      if (!isItemId(String(itemId))) return refresh(); // the API could never take it
      session.push(String(itemId));
      if (session.length > MAX_SESSION) session = session.slice(-MAX_SESSION);
      saveSession(session);
      return refresh();
    }

    function reset() {
      session = [];
      saveSession(session);
      return refresh();
    }

    refresh();
    return {
      view: view,
      reset: reset,
      refresh: refresh,
      session: () => session.slice(),
    };
  }

  /* The demo page: a product grid, the strip and the session trail. */
  async function demoShop(cfg) {
    function renderTrail(items) {
      cfg.trail.replaceChildren(
        ...items.slice(-12).map((id) => {
          const li = document.createElement("li");
          li.textContent = product(id).name + " #" + id;
          return li;
        })
      );
      cfg.sessionCount.textContent = items.length ? "(" + items.length + " viewed)" : "(empty)";
    }
    const strip = mount(cfg.strip, {
      apiBase: cfg.apiBase,
      k: cfg.k,
      excludeSeen: () => cfg.excludeSeen.checked,
      onUpdate: (data) => {
        renderTrail(strip ? strip.session() : loadSession());
        cfg.stripMeta.textContent =
          (data.used_fallback ? "Popular right now" : "Based on your session") +
          " · model " + data.model_version;
      },
    });
    cfg.excludeSeen.addEventListener("change", () => strip.refresh());
    cfg.reset.addEventListener("click", () => strip.reset());

    const response = await fetch(cfg.apiBase + "/catalog?limit=" + cfg.gridSize);
    const catalog = await response.json();
    cfg.grid.replaceChildren(
      ...catalog.items.map((id) => {
        const el = card(id, "grid-card");
        el.addEventListener("click", () => strip.view(id));
        return el;
      })
    );
    cfg.grid.dataset.ready = "true";
  }

  window.SeqrecWidget = { mount: mount, demoShop: demoShop, product: product };
})();
