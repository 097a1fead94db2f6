"""Similar items: faiss index, snapshots, nightly and online shelves, queries, tasks, CLI."""
