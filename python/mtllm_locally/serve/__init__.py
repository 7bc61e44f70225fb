"""The serving loop: the runtime (one per process), the call pipeline, the LiteLLM
provider byllm reaches, the deploy router and the teacher.

serve/ never imports learn/: it publishes captured calls (Runtime.on_call) and reads
deployments from the store (state/); wiring.py subscribes the learning loop."""
