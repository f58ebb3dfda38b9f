/* pagoda's chat page: streams /v1/chat/completions (SSE) into markdown-rendered messages.
 *
 * Every URL is relative to the page, so the page works behind --root-path. The API key, when the
 * server asks for one (401), is kept in localStorage and sent as "Authorization: Bearer" on every
 * call. Stop aborts the fetch; the server sees the disconnect and aborts the request. The image
 * button shows only for a model whose card in /v1/models lists the "vision" capability.
 */
(function () {
  "use strict";

  const KEY_STORE = "pagoda.apiKey";
  const SETTINGS_STORE = "pagoda.settings";
  const MAX_IMAGE_BYTES = 8 << 20;
  const $ = (id) => document.getElementById(id);
  const el = {};
  const state = { models: [], history: [], images: [], controller: null };

  // ------------------------------------------------------------------------------- settings
  function storedKey() {
    return localStorage.getItem(KEY_STORE) || "";
  }

  function loadSettings() {
    try {
      return JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}") || {};
    } catch (_) {
      return {};
    }
  }

  function saveSettings() {
    localStorage.setItem(SETTINGS_STORE, JSON.stringify({
      model: el.model.value, system: el.system.value,
      temperature: el.temperature.value, maxTokens: el.maxTokens.value,
    }));
  }

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = storedKey();
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  function setStatus(text, kind) {
    el.status.textContent = text || "";
    el.status.className = kind || "";
  }

  function askForKey(message) {
    el.keyPanel.hidden = false;
    el.keyHint.textContent = message;
    setStatus(message, "error");
    el.apiKey.focus();
  }

  function useKey() {
    const key = el.apiKey.value.trim();
    if (key) localStorage.setItem(KEY_STORE, key); else localStorage.removeItem(KEY_STORE);
    loadModels();
  }

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  async function apiError(response) {
    let message = response.statusText || "HTTP " + response.status;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) { /* not JSON: keep the status text */ }
    return new ApiError(response.status, message);
  }

  function keyMessage() {
    return storedKey() ? "The server refused this API key: enter the right one."
                       : "This server needs an API key.";
  }

  // --------------------------------------------------------------------------------- models
  async function loadModels() {
    setStatus("Loading models…");
    let response;
    try {
      response = await fetch("v1/models", { headers: headers(false) });
    } catch (e) {
      setStatus("Cannot reach the server: " + e.message, "error");
      return;
    }
    if (response.status === 401) {
      askForKey(keyMessage());
      return;
    }
    if (!response.ok) {
      setStatus((await apiError(response)).message, "error");
      return;
    }
    const body = await response.json();
    setModels(body.data || []);
    setStatus("");
    if (storedKey()) el.keyHint.textContent = "Key accepted.";
  }

  function supportsVision(card) {
    const caps = card && card.capabilities;
    if (Array.isArray(caps)) return caps.includes("vision");
    return Boolean(caps && caps.vision === true);
  }

  function setModels(cards) {
    state.models = cards;
    const wanted = el.model.value || loadSettings().model;
    el.model.replaceChildren(...cards.map((c) => new Option(c.id, c.id)));
    if (cards.some((c) => c.id === wanted)) el.model.value = wanted;
    applyModel();
  }

  function applyModel() {
    const card = state.models.find((c) => c.id === el.model.value);
    const vision = supportsVision(card);
    document.body.dataset.vision = String(vision);
    el.attach.hidden = !vision;
    if (!vision) clearImages();
    el.modelInfo.textContent = card && card.max_model_len ? "context: " + card.max_model_len + " tokens" : "";
    saveSettings();
  }

  // ------------------------------------------------------------------------------- messages
  function nearBottom() {
    const m = el.messages;
    return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
  }

  function addMessage(role, text, images) {
    const div = document.createElement("div");
    div.className = "message " + role;
    const content = document.createElement("div");
    content.className = "content";
    div.append(content);
    for (const url of images || []) {
      const img = document.createElement("img");
      img.src = url;
      img.alt = "attached image";
      div.append(img);
    }
    const note = document.createElement("div");
    note.className = "note";
    div.append(note);
    el.messages.append(div);
    setContent(div, text);
    return div;
  }

  function setContent(div, text) {
    const follow = nearBottom();
    const content = div.querySelector(".content");
    if (div.classList.contains("assistant")) {
      content.innerHTML = window.PagodaMarkdown.render(text);  // escapes everything it is given
      for (const pre of content.querySelectorAll("pre")) addCopyButton(pre);
    } else {
      content.textContent = text;
    }
    if (follow) el.messages.scrollTop = el.messages.scrollHeight;
  }

  function addCopyButton(pre) {
    if (!navigator.clipboard) return;
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy";
    button.textContent = "Copy";
    button.addEventListener("click", () => {
      navigator.clipboard.writeText(pre.querySelector("code").textContent).then(() => {
        button.textContent = "Copied";
      });
    });
    pre.append(button);
  }

  // -------------------------------------------------------------------------------- images
  function clearImages() {
    state.images = [];
    el.attachments.replaceChildren();
  }

  function showImages() {
    el.attachments.replaceChildren(...state.images.map((url, i) => {
      const box = document.createElement("span");
      box.className = "thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = "image to send";
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "×";
      remove.title = "Remove";
      remove.addEventListener("click", () => { state.images.splice(i, 1); showImages(); });
      box.append(img, remove);
      return box;
    }));
  }

  function addImages(files) {
    for (const file of files) {
      if (!file.type.startsWith("image/")) continue;
      if (file.size > MAX_IMAGE_BYTES) {
        setStatus(file.name + " is larger than " + (MAX_IMAGE_BYTES >> 20) + " MiB.", "error");
        continue;
      }
      const reader = new FileReader();
      reader.onload = () => {
        if (typeof reader.result === "string" && reader.result.startsWith("data:image/")) {
          state.images.push(reader.result);
          showImages();
        }
      };
      reader.readAsDataURL(file);
    }
  }

  // ----------------------------------------------------------------------------- streaming
  function requestBody(model, history) {
    const messages = [];
    const system = el.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...(history || state.history));
    const body = { model, messages, stream: true, stream_options: { include_usage: true } };
    const temperature = parseFloat(el.temperature.value);
    if (Number.isFinite(temperature)) body.temperature = temperature;
    const maxTokens = parseInt(el.maxTokens.value, 10);
    if (Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  /** A user turn: plain text, or OpenAI's content parts when images go with it. */
  function userContent(text, images) {
    if (!images.length) return text;
    return [{ type: "text", text }, ...images.map((url) => ({ type: "image_url", image_url: { url } }))];
  }

  /** Read an SSE body: onEvent(parsed JSON) per `data:` line, onBatch() after each network read.
   *  Returns true when the stream ended with [DONE]. */
  async function readEvents(response, onEvent, onBatch) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return false;
      buffer += decoder.decode(value, { stream: true });
      const parts = buffer.split("\n");
      buffer = parts.pop();
      for (const raw of parts) {
        const line = raw.replace(/\r$/, "");
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") {
          onBatch();
          reader.cancel().catch(() => {});
          return true;
        }
        onEvent(JSON.parse(data));
      }
      onBatch();
    }
  }

  function setBusy(busy) {
    el.send.hidden = busy;
    el.stop.hidden = !busy;
    el.stop.disabled = !busy;
  }

  async function send() {
    const text = el.prompt.value.trim();
    if (state.controller || (!text && !state.images.length)) return;
    const model = el.model.value;
    if (!model) {
      await loadModels();
      if (!el.model.value) return;
    }
    const images = state.images.slice();
    const history = state.history;  // "New chat" mid-stream replaces it: this turn stays in its own
    history.push({ role: "user", content: userContent(text, images) });
    const asked = addMessage("user", text, images);
    el.prompt.value = "";
    clearImages();

    const reply = addMessage("assistant", "");
    reply.classList.add("streaming");
    const note = reply.querySelector(".note");
    const controller = new AbortController();
    state.controller = controller;
    setBusy(true);
    setStatus("");
    let answer = "", finish = null, usage = null;
    try {
      const response = await fetch("v1/chat/completions", {
        method: "POST", headers: headers(true), signal: controller.signal,
        body: JSON.stringify(requestBody(el.model.value, history)),
      });
      if (!response.ok) throw await apiError(response);
      const complete = await readEvents(response, (event) => {
        if (event.error) throw new ApiError(0, event.error.message);
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) answer += choice.delta.content;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        if (event.usage) usage = event.usage;
      }, () => setContent(reply, answer));
      if (!complete) throw new ApiError(0, "The stream ended early.");
      note.textContent = [finish === "length" ? "stopped at max tokens" : "",
                          usage ? usage.completion_tokens + " tokens" : ""].filter(Boolean).join(" · ");
    } catch (e) {
      const stopped = e.name === "AbortError";
      reply.classList.add(stopped ? "stopped" : "error");
      note.textContent = stopped ? "stopped" : e.message;
      if (e.status === 401) askForKey(keyMessage());
      if (!answer) {  // nothing came back: take the question back so it can be sent again
        history.pop();
        asked.remove();
        reply.remove();
        if (history === state.history) {  // (not after "New chat")
          if (!el.prompt.value) el.prompt.value = text;
          state.images = images;
          showImages();
          if (!stopped) setStatus(e.message, "error");
        }
      }
    } finally {
      if (answer) history.push({ role: "assistant", content: answer });
      reply.classList.remove("streaming");
      state.controller = null;
      setBusy(false);
      el.prompt.focus();
    }
  }

  function stop() {
    if (state.controller) state.controller.abort();
  }

  function newChat() {
    stop();
    state.history = [];
    el.messages.replaceChildren();
    setStatus("");
  }

  // ---------------------------------------------------------------------------------- start
  function init() {
    for (const [name, id] of [["status", "status"], ["messages", "messages"], ["model", "model"],
                              ["modelInfo", "model-info"], ["system", "system"],
                              ["temperature", "temperature"], ["temperatureValue", "temperature-value"],
                              ["maxTokens", "max-tokens"], ["keyPanel", "key-panel"],
                              ["apiKey", "api-key"], ["keyHint", "key-hint"],
                              ["newChat", "new-chat"], ["attachments", "attachments"],
                              ["composer", "composer"], ["attach", "attach"], ["file", "file"],
                              ["prompt", "prompt"], ["send", "send"], ["stop", "stop"]]) {
      el[name] = $(id);
    }
    const saved = loadSettings();
    if (saved.system) el.system.value = saved.system;
    if (saved.temperature) el.temperature.value = saved.temperature;
    if (saved.maxTokens) el.maxTokens.value = saved.maxTokens;
    el.temperatureValue.textContent = el.temperature.value;
    if (storedKey()) {
      el.apiKey.value = storedKey();
      el.keyPanel.hidden = false;
    }

    el.composer.addEventListener("submit", (e) => { e.preventDefault(); send(); });
    el.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
    });
    el.stop.addEventListener("click", stop);
    el.newChat.addEventListener("click", newChat);
    el.model.addEventListener("change", applyModel);
    el.temperature.addEventListener("input", () => {
      el.temperatureValue.textContent = el.temperature.value;
      saveSettings();
    });
    for (const input of [el.system, el.maxTokens]) input.addEventListener("change", saveSettings);
    el.keyPanel.addEventListener("submit", (e) => { e.preventDefault(); useKey(); });
    el.attach.addEventListener("click", () => el.file.click());
    el.file.addEventListener("change", () => { addImages(el.file.files); el.file.value = ""; });
    loadModels();
  }

  window.PagodaChat = { setModels, supportsVision, requestBody, userContent };
  document.addEventListener("DOMContentLoaded", init);
})();
