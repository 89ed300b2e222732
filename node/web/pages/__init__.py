"""Server-rendered dashboard pages, one module per page."""
