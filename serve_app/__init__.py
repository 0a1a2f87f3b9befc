"""A distributed multimodal reranker on Ray Serve."""
