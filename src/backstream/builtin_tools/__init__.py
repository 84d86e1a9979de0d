"""Tools the server runs itself, asked for in `tools` by `type` (semantic_search_v1, database_query_v1, ...).

`ServerTools` is what a run sees: the request's built-in tools and its MCP servers
behind one interface (specs for the model, `call`, per-step system additions,
citations). Each tool lives in its own module, imported only when a request uses it.
"""
