"""The RAG model: marginal likelihoods, generators, decoding, RagModel, loading, in-process RAG (no Ray or Serve)."""
