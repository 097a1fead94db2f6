"""The browser console for reviewers and admins (`enrich console`): server-rendered pages, plain forms and a
little JavaScript for the keyboard; every action calls the same library code as the CLI and the workers."""
