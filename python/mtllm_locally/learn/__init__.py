"""The learning loop: what was served (the store) becomes adapters (later milestones).
learn/ never imports serve/: the two loops meet only at the store and at deploy."""
