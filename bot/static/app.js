// Upload page: send the photo to /api/search and draw the result grid. Text is set with textContent only.
(function () {
  "use strict";
  const form = document.getElementById("upload");
  const input = document.getElementById("file");
  const drop = document.getElementById("drop");
  const statusEl = document.getElementById("status");
  const results = document.getElementById("results");
  const previewBox = document.getElementById("preview-box");
  const preview = document.getElementById("preview");

  function setStatus(text, isError) {
    statusEl.textContent = text;
    statusEl.className = isError ? "error" : "";
  }

  function safeUrl(value) {
    if (typeof value !== "string") return null;
    if (value.startsWith("/images/")) return value;
    try {
      const url = new URL(value);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  function card(item, rank) {
    const el = document.createElement("article");
    el.className = "card";
    const imageUrl = safeUrl(item.image_url);
    if (imageUrl) {
      const img = document.createElement("img");
      img.src = imageUrl;
      img.alt = item.title || "";
      img.loading = "lazy";
      el.appendChild(img);
    }
    const title = document.createElement("div");
    title.className = "title";
    title.textContent = rank + ". " + (item.title || item.id);
    el.appendChild(title);
    if (item.price) {
      const price = document.createElement("div");
      price.className = "price";
      price.textContent = item.price + (item.currency ? " " + item.currency : "");
      el.appendChild(price);
    }
    const link = safeUrl(item.url);
    if (link) {
      const a = document.createElement("a");
      a.href = link;
      a.target = "_blank";
      a.rel = "noopener noreferrer";
      a.textContent = "View product";
      el.appendChild(a);
    }
    return el;
  }

  async function search(file) {
    results.replaceChildren();
    if (!file) return;
    preview.src = URL.createObjectURL(file);
    previewBox.hidden = false;
    setStatus("Searching…", false);
    const body = new FormData();
    body.append("image", file);
    let response, data = null;
    try {
      response = await fetch("/api/search", { method: "POST", body: body });
    } catch (e) {
      setStatus("The search service could not be reached. Please try again.", true);
      return;
    }
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      // Our errors are JSON {error, message, hint}; a 429 from anything else still says how long to wait.
      const wait = response.headers.get("Retry-After");
      const fallback = response.status === 429
        ? "Too many searches. Please wait " + (/^\d+$/.test(wait || "") ? wait + " s" : "a minute") + " and try again."
        : "The search failed.";
      setStatus(data && data.message ? (data.message + " " + (data.hint || "")).trim() : fallback, true);
      return;
    }
    if (!data) {
      setStatus("The search service could not be reached. Please try again.", true);
      return;
    }
    const items = data.results || [];
    items.forEach(function (item, i) { results.appendChild(card(item, i + 1)); });
    setStatus(items.length ? items.length + " products found in " + Math.round(data.took_ms) + " ms."
                           : "Nothing similar found. Try another photo.", false);
  }

  input.addEventListener("change", function () { search(input.files[0]); });
  form.addEventListener("submit", function (e) { e.preventDefault(); search(input.files[0]); });
  ["dragenter", "dragover"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.add("over"); });
  });
  ["dragleave", "drop"].forEach(function (name) {
    drop.addEventListener(name, function (e) { e.preventDefault(); drop.classList.remove("over"); });
  });
  drop.addEventListener("drop", function (e) {
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) search(file);
  });
})();
