"""The outside world: sources, capture threads, sessions, recording, the Gradio page and the CLI."""
