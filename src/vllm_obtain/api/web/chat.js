// Chat: the conversation, its settings, and one streamed /v1/chat/completions per question.

import { ApiError, call, serverEvents } from "./api.js";
import {
  clearConversations,
  loadConversations,
  newConversation,
  saveConversations,
  titleOf,
} from "./conversations.js";
import { renderMarkdown } from "./markdown.js";
import { $, fillPicker } from "./dom.js";

/** The settings box's problems, shown beside it rather than sent to the server. */
class SettingsError extends Error {}

function parsedJson(text, what) {
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new SettingsError(`${what} is not valid JSON: ${error.message}`);
  }
}

function numberOf(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

/** The request's parameters from the settings box (OpenAI's names). */
function chatParameters() {
  const parameters = {
    model: $("model").value,
    temperature: numberOf("temperature"),
    top_p: numberOf("top-p"),
    max_tokens: numberOf("max-tokens"),
    seed: numberOf("seed"),
  };
  const schema = $("json-schema").value.trim();
  if (schema) {
    parameters.response_format = {
      type: "json_schema",
      json_schema: { name: "playground", schema: parsedJson(schema, "The JSON schema"), strict: true },
    };
  }
  const tools = $("tools").value.trim();
  if (tools) {
    const parsed = parsedJson(tools, "The tools");
    if (!Array.isArray(parsed)) throw new SettingsError("The tools must be a JSON list.");
    parameters.tools = parsed;
    parameters.tool_choice = $("tool-choice").value;
  }
  return Object.fromEntries(Object.entries(parameters).filter(([, v]) => v !== undefined));
}

/** A tool call as plain text, for the conversation sent back to the model. */
function toolCallText(call) {
  return `${call.function.name}(${call.function.arguments})`;
}

function historyOf(conversation) {
  const system = $("system-prompt").value.trim();
  const messages = system ? [{ role: "system", content: system }] : [];
  for (const message of conversation.messages) {
    const content = message.content || (message.tool_calls ?? []).map(toolCallText).join("\n");
    if (content) messages.push({ role: message.role, content });
  }
  return messages;
}

function statsText(stats) {
  const parts = [`${stats.tokens} tokens`];
  if (stats.ttftMs !== null) parts.push(`TTFT ${Math.round(stats.ttftMs)} ms`);
  if (stats.tokensPerSecond !== null) parts.push(`${stats.tokensPerSecond.toFixed(1)} tokens/s`);
  if (stats.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderToolCalls(element, toolCalls) {
  element.replaceChildren(
    ...toolCalls.map((call) => {
      const box = document.createElement("div");
      box.dataset.role = "tool-call";
      const name = document.createElement("strong");
      name.textContent = `tool call: ${call.function.name}`;
      const args = document.createElement("pre");
      args.textContent = call.function.arguments;
      box.append(name, args);
      return box;
    }),
  );
}

/** One message's element: the user's as text, the assistant's as Markdown. */
/** A request the server refused or that failed: its message in place of the answer. */
function showRefusal({ body, stats }, message) {
  const shown = document.createElement("p");
  shown.className = "error";
  shown.setAttribute("role", "alert");
  shown.textContent = message;
  body.replaceChildren(shown);
  stats.textContent = "";
}

function messageElement(message) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  const body = document.createElement("div");
  body.dataset.role = message.role;
  item.append(body);
  if (message.role === "assistant") {
    body.className = "markdown";
    renderMarkdown(body, message.content ?? "");
    const tools = document.createElement("div");
    tools.className = "tool-calls";
    renderToolCalls(tools, message.tool_calls ?? []);
    const stats = document.createElement("p");
    stats.className = "stats";
    if (message.stats) stats.textContent = statsText(message.stats);
    item.append(tools, stats);
    if (message.error) showRefusal({ body, stats }, message.error);
  } else {
    body.textContent = message.content;
  }
  return item;
}

/** Tool-call deltas merged by index, as OpenAI streams them (name first, arguments in parts). */
function mergeToolCalls(calls, deltas) {
  for (const delta of deltas) {
    const call = (calls[delta.index] ??= { id: delta.id, type: "function", function: { name: "", arguments: "" } });
    if (delta.id) call.id = delta.id;
    if (delta.function?.name) call.function.name += delta.function.name;
    if (delta.function?.arguments) call.function.arguments += delta.function.arguments;
  }
}

/** Read one streamed answer into `answer` (the message kept) and its elements; `progress`
 * holds what has come so far (the first token's time, the tokens), for a Stop midway. */
async function streamAnswer(response, answer, elements, progress) {
  let scheduled = false;
  const render = () => {
    scheduled = false;
    renderMarkdown(elements.body, answer.content);
  };
  for await (const event of serverEvents(response)) {
    if (event.error) throw new ApiError(0, event.error.message, event.error.type);
    if (event.usage) progress.tokens = event.usage.completion_tokens;
    const delta = event.choices?.[0]?.delta;
    if (!delta) continue;
    if (delta.content || delta.tool_calls) progress.firstAt ??= performance.now();
    if (delta.content) {
      answer.content += delta.content;
      progress.tokens += 1; // one piece per token as we stream; the usage event has the count
      if (!scheduled) {
        scheduled = true;
        requestAnimationFrame(render);
      }
    }
    if (delta.tool_calls) {
      answer.tool_calls ??= [];
      mergeToolCalls(answer.tool_calls, delta.tool_calls);
      renderToolCalls(elements.tools, answer.tool_calls);
    }
  }
  render();
}

function timings(started, firstAt, tokens, stopped) {
  const ended = performance.now();
  const decoding = firstAt === null ? 0 : (ended - firstAt) / 1000;
  return {
    tokens,
    ttftMs: firstAt === null ? null : firstAt - started,
    // After the first token: the rate the model decodes at, not counting the prompt's time.
    tokensPerSecond: tokens > 1 && decoding > 0 ? (tokens - 1) / decoding : null,
    stopped,
  };
}

export function setUpChat({ chatModels, contexts }) {
  let conversations = loadConversations();
  let current = conversations[0] ?? newConversation();
  let controller = null;

  fillPicker($("model"), chatModels);

  // What the chosen model may hold per request; a larger max tokens is still sent, so that the
  // server's own message says why it cannot be.
  function showContext() {
    const context = contexts?.[$("model").value];
    $("model-context").textContent = context
      ? `Context: ${context.toLocaleString("en")} tokens (prompt and answer)`
      : "";
  }
  $("model").addEventListener("change", showContext);
  showContext();

  function keep() {
    conversations = [current, ...conversations.filter((c) => c.id !== current.id)].filter(
      (c) => c.messages.length > 0,
    );
    saveConversations(conversations);
    showConversations();
  }

  function showConversations() {
    $("conversation-list").replaceChildren(
      ...conversations.map((conversation) => {
        const item = document.createElement("li");
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = conversation.title;
        button.setAttribute("aria-current", String(conversation.id === current.id));
        button.addEventListener("click", () => {
          if (controller) return;
          current = conversation;
          showConversations();
          showMessages();
        });
        item.append(button);
        return item;
      }),
    );
  }

  function showMessages() {
    $("messages").replaceChildren(...current.messages.map(messageElement));
  }

  function generating(on) {
    $("send").disabled = on;
    $("stop").disabled = !on;
  }

  async function send(text) {
    const settingsError = $("settings-error");
    settingsError.hidden = true;
    let parameters;
    try {
      parameters = chatParameters();
    } catch (error) {
      settingsError.textContent = error.message;
      settingsError.hidden = false;
      return;
    }
    const question = { role: "user", content: text };
    current.messages.push(question);
    if (current.messages.length === 1) current.title = titleOf(text);
    const messages = historyOf(current);
    const answer = { role: "assistant", content: "" };
    current.messages.push(answer);
    $("messages").append(messageElement(question));
    const item = messageElement(answer);
    item.dataset.state = "streaming";
    $("messages").append(item);
    const elements = {
      body: item.querySelector('[data-role="assistant"]'),
      tools: item.querySelector(".tool-calls"),
      stats: item.querySelector(".stats"),
    };
    controller = new AbortController();
    generating(true);
    const started = performance.now();
    const progress = { firstAt: null, tokens: 0 };
    try {
      const body = { ...parameters, messages, stream: true, stream_options: { include_usage: true } };
      const response = await call("v1/chat/completions", { body, signal: controller.signal });
      await streamAnswer(response, answer, elements, progress);
      answer.stats = timings(started, progress.firstAt, progress.tokens, false);
      elements.stats.textContent = statsText(answer.stats);
      item.dataset.state = "done";
    } catch (error) {
      if (error.name === "AbortError") {
        renderMarkdown(elements.body, answer.content);
        answer.stats = timings(started, progress.firstAt, progress.tokens, true);
        elements.stats.textContent = statsText(answer.stats);
        item.dataset.state = "stopped";
      } else {
        answer.error = error.message;
        showRefusal(elements, error.message);
        item.dataset.state = "error";
      }
    } finally {
      controller = null;
      generating(false);
      keep();
    }
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("message").value.trim();
    if (!text || controller) return;
    $("message").value = "";
    send(text);
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  // Aborting the fetch closes the connection: the server stops generating, as for any client
  // that leaves.
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    if (controller) return;
    current = newConversation();
    showConversations();
    showMessages();
    $("message").focus();
  });
  $("clear-chats").addEventListener("click", () => {
    if (controller) return;
    clearConversations();
    conversations = [];
    current = newConversation();
    showConversations();
    showMessages();
  });

  showConversations();
  showMessages();
}
