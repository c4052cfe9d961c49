// Embeddings: two texts through /v1/embeddings, and how alike their vectors are.

import { call } from "./api.js";
import { $, fillPicker } from "./dom.js";

export function cosineSimilarity(a, b) {
  let dot = 0;
  let normA = 0;
  let normB = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    normA += a[i] * a[i];
    normB += b[i] * b[i];
  }
  return dot / (Math.sqrt(normA) * Math.sqrt(normB) || 1);
}

export function setUpEmbeddings({ embeddingModels }) {
  const picker = $("embedding-model");
  fillPicker(picker, embeddingModels);
  const output = $("similarity");
  if (embeddingModels.length === 0) output.textContent = "This server serves no embedding model.";

  $("embeddings-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    output.classList.remove("error");
    output.textContent = "…";
    try {
      const body = { model: picker.value, input: [$("first-text").value, $("second-text").value] };
      const { data } = await (await call("v1/embeddings", { body })).json();
      const similarity = cosineSimilarity(data[0].embedding, data[1].embedding);
      output.dataset.value = similarity.toFixed(4);
      output.textContent = `Cosine similarity: ${similarity.toFixed(4)} (${data[0].embedding.length} dimensions)`;
    } catch (error) {
      output.classList.add("error");
      output.textContent = error.message;
    }
  });
}
