"""The RAG model: marginal likelihoods, generators, decoding, RagModel, loading, local RAG (no Ray)."""
