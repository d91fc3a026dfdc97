"""The RAG model (pure PyTorch math, generators, decoding) and the Ray Serve application."""
