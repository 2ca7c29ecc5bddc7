"""The gateway core: a request's way after the API layer, with no Ray in it.

Engine clients that rank replicas, forward the client's body to the chosen engine's server and relay
its answer back as bytes (`routed`, `split`, `relay`, `upstream`, `sse`), and the gateway's own HTTP
listener (`listener`). Ray Serve wiring lives in app/deployments; decisions live in app/router.
"""
