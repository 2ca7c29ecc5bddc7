"""Ray Serve wiring only: the OpenAI ingress, engine replicas, and the app builder `serve run` imports.
Decisions live in app.router and request handling in app.api; nothing here is imported by them."""
