"""Lightning callbacks over the pruning core (they arrive with the Lightning layer)."""
