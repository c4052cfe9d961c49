// The page: the key prompt when the server asks for a key, then the chat, embeddings and
// dashboard views. Nothing is shown before the API has accepted this browser's key (or
// needs none).

import { apiKey, forgetKey, getJson, rememberKey } from "./api.js";
import { setUpChat } from "./chat.js";
import { setUpDashboard } from "./dashboard.js";
import { setUpEmbeddings } from "./embeddings.js";
import { $ } from "./dom.js";

function showTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => {
      for (const other of tabs) {
        const selected = other === tab;
        other.setAttribute("aria-selected", String(selected));
        $(other.getAttribute("aria-controls")).hidden = !selected;
      }
    });
  }
}

/** Chat models and embedding models: /v1/models lists both; /health tells which embed. */
async function servedModels() {
  const { data } = await getJson("v1/models");
  const health = await getJson("health", { allow: [503] }).catch(() => ({}));
  const embedding = new Set((health.embedding_models ?? []).map((m) => m.id));
  const ids = data.map((m) => m.id);
  return {
    chatModels: ids.filter((id) => !embedding.has(id)),
    embeddingModels: ids.filter((id) => embedding.has(id)),
    // Tokens one request may hold here (prompt and answer), where the server knows it.
    contexts: Object.fromEntries(data.map((m) => [m.id, m.max_model_len ?? null])),
  };
}

function start(models) {
  $("key-prompt").hidden = true;
  $("app").hidden = false;
  $("forget-key").hidden = !apiKey();
  showTabs();
  setUpChat(models);
  setUpEmbeddings(models);
  setUpDashboard();
}

function askForKey(message) {
  $("app").hidden = true;
  $("key-prompt").hidden = false;
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message ?? "";
  $("api-key").focus();
}

async function boot() {
  try {
    start(await servedModels());
  } catch (error) {
    if (error.status !== 401) {
      document.body.textContent = `The server could not be reached: ${error.message}`;
      return;
    }
    // A key kept from before and refused now (rotated): say so; a first visit just asks.
    const refused = apiKey() ? error.message : null;
    forgetKey();
    askForKey(refused);
  }
}

$("key-prompt").addEventListener("submit", (event) => {
  event.preventDefault();
  rememberKey($("api-key").value.trim());
  $("api-key").value = "";
  boot();
});
$("forget-key").addEventListener("click", () => {
  forgetKey();
  location.reload();
});

boot();
