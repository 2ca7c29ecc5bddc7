"""The gateway's HTTP face: its OpenAI endpoints over the gateway core (`gateway_serving`), the ASGI app
and the gateway's own listener. The only place that turns gateway and engine errors into OpenAI errors."""
