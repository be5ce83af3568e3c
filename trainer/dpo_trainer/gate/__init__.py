"""The eval gate: scoring an adapter on held-out pairs, and the intervals that decide it."""
