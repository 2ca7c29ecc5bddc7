"""Ray Serve wiring only: the ingress deployment, engine replicas, the endpoint watcher, the state actor and
its sync loops, the Serve-handle transport and request router, and the app builder `serve run` imports.
Decisions live in app/router, a request's way in app/gateway and app/api; nothing there imports this."""
