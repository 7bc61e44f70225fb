"""What both loops share: the call store and its typed queries (store.py: calls, turns,
feedback; registry.py: adapter versions, deployments, trainings), task identity
(task.py), the learning policy (policy.py) and private files (files.py).

state/ imports the engine's errors only; serve/ and learn/ import state/, never each other."""
