"""Retrieval substrate: passages, encoders, sharded FAISS index on Ray actors."""
