"""The HTTP server's home (issue: `trine serve`): routers over one shared encoder, reranker and
retriever. Nothing is served yet; docs/architecture.md says where each route goes."""
