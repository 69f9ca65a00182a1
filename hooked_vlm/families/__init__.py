"""One module per model family; each composes the shared blocks and knows its config and weight names."""
