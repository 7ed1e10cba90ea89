"""What every stage shares: model and tokenizer loading, chat templates, data readers,
artifacts and manifests, progress bars, and the one decode loop."""
