"""From a checkpoint to numbers a clinician can read: inference over shards, the reference
fixed on the training cohort, every metric per split and center, the HTML report, and
predictions for new patients. Loads weights without importing the training loop."""
