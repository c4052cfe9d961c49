// Calls to this server's API, with the key the person gave (kept in this tab only).
// Paths are relative: a reverse proxy may serve the whole server under a prefix.

const KEY_STORAGE = "vllm-obtain.api-key";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function rememberKey(key) {
  sessionStorage.setItem(KEY_STORAGE, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
}

/** An OpenAI error envelope (or a transport failure) as an exception. */
export class ApiError extends Error {
  constructor(status, message, type) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  let type = "";
  try {
    const body = await response.json();
    message = body.error?.message ?? message;
    type = body.error?.type ?? "";
  } catch {
    // not JSON: the status line says it
  }
  return new ApiError(response.status, message, type);
}

/** fetch() with the key, JSON in, and non-2xx answers (but those in `allow`) thrown as
 * ApiError. */
export async function call(path, { method, body, signal, allow = [] } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: method ?? (body === undefined ? "GET" : "POST"),
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok && !allow.includes(response.status)) throw await errorOf(response);
  return response;
}

export async function getJson(path, options = {}) {
  return (await call(path, options)).json();
}

/** The SSE `data:` payloads of a streamed answer, parsed, until `[DONE]`. */
export async function* serverEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
