"""Recovery: rebuild books from storage, verify them against snapshots and replays."""
