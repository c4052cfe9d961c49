// Conversations, kept in this browser (localStorage) until cleared.

const STORE = "vllm-obtain.conversations";

export function loadConversations() {
  try {
    const list = JSON.parse(localStorage.getItem(STORE) ?? "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return []; // written by another version, or by hand: start afresh
  }
}

export function saveConversations(list) {
  try {
    localStorage.setItem(STORE, JSON.stringify(list));
  } catch {
    // full or disabled storage: the conversation still works, it is just not kept
  }
}

export function clearConversations() {
  localStorage.removeItem(STORE);
}

export function newConversation() {
  // Not crypto.randomUUID(): browsers give it to secure origins only, and a server on the
  // LAN is plain http.
  const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
  return { id, title: "New chat", messages: [] };
}

/** A conversation's title: the start of its first question. */
export function titleOf(text) {
  const line = text.trim().split("\n")[0];
  return line.length > 40 ? `${line.slice(0, 40)}…` : line || "New chat";
}
