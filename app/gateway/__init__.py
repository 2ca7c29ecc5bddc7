"""The gateway core: a request's way after the API layer, with no Ray in it.

The EngineClient and Transport protocols (`client`), every model's client built in one place
(`client_builder`: routed, split into prefill and decode, or unranked), the relay that forwards the
client's body to the chosen engine's server and hands its answer back as bytes (`relay`, `sse`), and
what admission sees of the fleet (`fleet_load`). Ray Serve wiring lives in app/deployments; decisions
live in app/router; OpenAI errors are made only in app/api.
"""
