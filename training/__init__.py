"""Ray Train fine-tuning of the RAG model, index refresh and evaluation."""
