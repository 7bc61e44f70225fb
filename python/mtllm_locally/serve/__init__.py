"""The serving loop's integrations: the LiteLLM provider byllm reaches, and the Jac plugin."""
