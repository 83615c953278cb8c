"""Online loading: shards (or a folder) -> decoded, augmented, batched samples; nothing here writes data."""
