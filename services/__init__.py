"""The RAG model and the Ray Serve application that serves it, as two subpackages."""
