"""The application: the `enrich` CLI root and the quickstart."""
